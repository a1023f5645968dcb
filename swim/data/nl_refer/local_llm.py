"""A local stand-in for an OpenAI-compatible LLM endpoint: tests, ``make demo-build`` and benchmarks, no network.

Why: `swim.data.nl_refer.build` talks to any OpenAI-compatible server through the official ``openai`` client.
To test that client code as it runs against a paid API or ``vllm serve`` (retries, timeouts, resumption after a
crash, batch resubmission), the stand-in speaks the same wire format on 127.0.0.1, so the code under test is the
real client and only the model is replaced. The "model" is a `Responder`: a function from the request body to a
`Reply`. `SceneResponder` rewrites the records of the synthetic shapes videos deterministically (it knows each
record's objects from ``scenes.json``); `FaultResponder` wraps it to inject, per record, the defects a real model
or server shows (bad tags, leaked placeholders, invalid JSON, refusals, 429/500, dropped connections, hangs).

Implemented (`LocalLLMServer`, a threaded ``http.server`` in a background thread, HTTP/1.1 keep-alive):

- ``POST /v1/chat/completions``: a ``chat.completion`` object (one choice; ``usage`` estimated as ceil(chars / 4)
  of the messages' and of the reply's text); a non-200 `Reply` becomes OpenAI's error JSON
  ``{"error": {"message", "type", "param", "code"}}`` with the reply's headers (e.g. ``Retry-After``);
- the Batch API subset: ``POST /v1/files`` (multipart), ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
  ``DELETE /v1/files/{id}``, ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.
  A batch runs its JSONL lines through the same responder in a background thread (validating -> in_progress ->
  finalizing -> completed) and writes OpenAI's output and error files; ``batch_drop_every=k`` drops every k-th
  line (no output, no error line; the batch ends "expired") to test resubmission of missing requests;
- ``GET /v1/models`` (one model, ``local-llm``), for clients that probe the server;
- counters (`LocalLLMServer.received`, ``served``, ``statuses``, ...) and an ``on_request`` hook, so that tests can
  check that every request was answered exactly once, or kill the client at a chosen request.

Not implemented: streaming (``stream: true`` is answered 400), ``n > 1``, tools/function calling, logprobs,
embeddings and the other endpoints (404), listing files or batches, authentication (any API key is accepted),
token counting (usage is an estimate) and schema enforcement (``response_format`` is accepted and ignored: the
responder decides the reply, which is what lets `FaultResponder` send invalid JSON). Unlike OpenAI, the lines
of an expired batch that were not run get no ``batch_expired`` line in the error file: they are simply missing
(a client must handle both), and output lines come in input order (OpenAI gives no order: key by custom_id).

CLI: ``python -m swim.data.nl_refer.local_llm --scenes scenes.json [--port 0] [--latency 0.0]`` prints
``LOCAL_LLM_URL=http://127.0.0.1:PORT/v1`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import email.parser
import email.policy
import hashlib
import json
import logging
import math
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from swim.data.nl_refer.prompt import payload_from_messages

logger = logging.getLogger(__name__)

MODEL_NAME = "local-llm"
BATCH_ENDPOINT = "/v1/chat/completions"
BATCH_MAX_LINES = 50_000  # OpenAI: at most 50,000 requests per batch
BATCH_MAX_BYTES = 200_000_000  # OpenAI: input files up to 200 MB
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")

# The fixed alternative head noun of a shape already used by an earlier object of the record.
ALTERNATIVE_NOUN = {"circle": "disc", "square": "block", "triangle": "wedge", "diamond": "rhombus"}
_FALLBACK_NOUNS = ("figure", "form", "piece")


@dataclass
class Reply:
    """What a responder answers to one request body.

    ``status`` 200: a chat completion with ``content`` / ``refusal`` / ``finish_reason``; otherwise an error
    response whose message is ``content``. ``headers`` are added to the HTTP response; ``delay_s`` delays it (on
    top of the server's ``latency_s``). ``action`` "reset": close the connection without any reply (RST);
    "hang": send nothing for ``delay_s`` seconds, then close. Batches ignore delays and turn actions into 500s.
    """

    status: int = 200
    content: str | None = None
    finish_reason: str = "stop"
    refusal: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    action: str | None = None  # "reset" | "hang"


Responder = Callable[[dict], Reply]


def body_key(body: dict) -> str:
    """sha256 of the canonical JSON of a request body: the key of `LocalLLMServer.served`."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _message_chars(messages: Any) -> int:
    total = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):  # content parts
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


def chat_completion(body: dict, reply: Reply) -> dict[str, Any]:
    """The ``chat.completion`` object of a 200 reply."""
    prompt_tokens = math.ceil(_message_chars(body.get("messages")) / 4)
    completion_tokens = _tokens(reply.content or "")
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or MODEL_NAME),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content, "refusal": reply.refusal},
                "logprobs": None,
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": MODEL_NAME,
    }


_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    429: ("requests", "rate_limit_exceeded"),
}


def error_body(status: int, message: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON for an HTTP status."""
    kind, default_code = _ERROR_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    if message is None:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = f"HTTP {status}"
    return {"error": {"message": message, "type": kind, "param": None, "code": code or default_code}}


def _call(responder: Responder, body: dict) -> Reply:
    try:
        reply = responder(body)
    except Exception as e:  # a responder bug is a 500, as from a real server, and is logged
        logger.exception("responder failed")
        return Reply(status=500, content=f"responder error: {type(e).__name__}: {e}")
    if not isinstance(reply, Reply):
        return Reply(status=500, content=f"responder returned {type(reply).__name__}, not Reply")
    return reply


# ---------------------------------------------------------------------------------------------------------
# The server


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: benchmarks open 64+ connections at once
    owner: LocalLLMServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    server_version = "swim-local-llm"
    server: _HTTPServer

    # -- plumbing

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> bool:
        """Write one whole response; False when the client is gone."""
        if isinstance(payload, bytes):
            data, ctype = payload, content_type or "application/octet-stream"
        else:
            data, ctype = json.dumps(payload, ensure_ascii=False).encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # BrokenPipe, ConnectionReset: the client gave up (e.g. its timeout)
            self.close_connection = True
            return False
        return True

    def _error(self, status: int, message: str, code: str | None = None) -> bool:
        return self._send(status, error_body(status, message, code))

    def _json_body(self) -> dict | None:
        raw = self._read_body()
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            self._error(400, f"We could not parse the JSON body of your request: {e}")
            return None
        if not isinstance(body, dict):
            self._error(400, "The request body must be a JSON object.")
            return None
        return body

    # -- routing

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0].rstrip("/")
        parts = path.split("/")[1:]  # "", "v1", ...
        if method == "POST" and path == "/v1/chat/completions":
            return self._chat(owner)
        if method == "GET" and path == "/v1/models":
            return self._send(200, {"object": "list", "data": [_model_object()]})
        if parts[:2] == ["v1", "files"]:
            if method == "POST" and len(parts) == 2:
                return self._upload(owner)
            if len(parts) >= 3:
                return self._file(owner, method, parts[2], parts[3:])
        if parts[:2] == ["v1", "batches"]:
            if method == "POST" and len(parts) == 2:
                body = self._json_body()
                if body is not None:
                    self._send(*owner._create_batch(body))
                return None
            if len(parts) >= 3:
                return self._batch(owner, method, parts[2], parts[3:])
        if method == "POST":
            self._read_body()  # keep the connection usable
        return self._error(404, f"Invalid URL ({method} {self.path})", "unknown_url")

    # -- chat completions

    def _chat(self, owner: LocalLLMServer) -> None:
        body = self._json_body()
        if body is None:
            return
        if not isinstance(body.get("messages"), list):
            self._error(400, "'messages' is a required property", "missing_required_parameter")
            return
        if body.get("stream"):
            self._error(400, "streaming is not supported by the local stand-in", "unsupported_parameter")
            return
        count = owner._on_received(body)
        reply = _call(owner.responder, body)
        owner._sleep(owner.latency_s + (reply.delay_s if reply.action != "hang" else 0.0))
        if reply.action == "reset":
            owner._count_action("reset")
            self._reset()
            return
        if reply.action == "hang":
            owner._count_action("hang")
            owner._sleep(reply.delay_s)
            self.close_connection = True  # close without a reply
            return
        if reply.status == 200:
            payload = chat_completion(body, reply)
        else:
            payload = error_body(reply.status, reply.content)
        if self._send(reply.status, payload, reply.headers):
            owner._on_served(body, reply.status)
        logger.debug("chat request %d -> %d", count, reply.status)

    def _reset(self) -> None:
        """Close the socket at once with an RST, without any reply."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # its reference would defer the real close
            self.connection.close()
        except OSError:
            pass

    # -- files

    def _upload(self, owner: LocalLLMServer) -> None:
        ctype = self.headers.get("Content-Type") or ""
        raw = self._read_body()
        if not ctype.lower().startswith("multipart/form-data"):
            self._error(400, "Expected a multipart/form-data body with 'file' and 'purpose'.")
            return
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + raw
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        if message.is_multipart():
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name:
                    fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
        if "file" not in fields:
            self._error(400, "'file' is a required property", "missing_required_parameter")
            return
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if purpose not in FILE_PURPOSES:
            self._error(400, f"'{purpose}' is not one of {list(FILE_PURPOSES)} - 'purpose'", "invalid_value")
            return
        filename, data = fields["file"]
        self._send(200, owner._add_file(data, filename or "upload", purpose))

    def _file(self, owner: LocalLLMServer, method: str, file_id: str, rest: list[str]) -> None:
        with owner._lock:
            entry = owner._files.get(file_id)
        if entry is None:
            self._error(404, f"No such File object: {file_id}", "file_not_found")
        elif method == "GET" and not rest:
            self._send(200, entry[0])
        elif method == "GET" and rest == ["content"]:
            self._send(200, entry[1])
        elif method == "DELETE" and not rest:
            with owner._lock:
                owner._files.pop(file_id, None)
            self._send(200, {"id": file_id, "object": "file", "deleted": True})
        else:
            self._error(404, f"Invalid URL ({method} {self.path})", "unknown_url")

    # -- batches

    def _batch(self, owner: LocalLLMServer, method: str, batch_id: str, rest: list[str]) -> None:
        if method == "POST":
            self._read_body()
        if method == "GET" and not rest:
            batch = owner.batch(batch_id)
            if batch is None:
                self._error(404, f"No batch found with id '{batch_id}'.", "batch_not_found")
            else:
                self._send(200, batch)
        elif method == "POST" and rest == ["cancel"]:
            self._send(*owner._cancel_batch(batch_id))
        else:
            self._error(404, f"Invalid URL ({method} {self.path})", "unknown_url")


def _model_object() -> dict[str, Any]:
    return {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "swim"}


class LocalLLMServer:
    """An OpenAI-compatible server on ``host:port`` (0: a free port) answering with ``responder``.

    Use as a context manager (or `start` / `stop`); `base_url` is the client's ``base_url``. ``latency_s``
    delays every chat reply (in its handler thread; concurrent requests overlap). ``on_request(count, body)`` is
    called when the count-th chat request arrives, before it is answered. ``batch_drop_every=k`` drops every
    k-th line of each batch (no output, no error line; the batch ends "expired"); ``batch_max_lines`` /
    ``batch_max_bytes`` are OpenAI's limits of one batch input file (beyond them the batch fails).

    Counters (read them when the traffic is over; updates are under a lock): ``received`` (chat requests
    received), ``served`` (`body_key` -> number of 200 chat replies fully written to the socket), ``statuses``
    (status code -> chat replies written), ``actions`` ("reset"/"hang" -> count), ``batch_lines`` (batch lines
    run through the responder), ``batch_served`` (`body_key` -> 200 batch lines).
    """

    def __init__(
        self,
        responder: Responder,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        on_request: Callable[[int, dict], None] | None = None,
        batch_drop_every: int | None = None,
        batch_max_lines: int = BATCH_MAX_LINES,
        batch_max_bytes: int = BATCH_MAX_BYTES,
    ) -> None:
        if batch_drop_every is not None and batch_drop_every < 1:
            raise ValueError(f"batch_drop_every must be >= 1, got {batch_drop_every}")
        self.responder = responder
        self.host = host
        self.port = port
        self.latency_s = float(latency_s)
        self.on_request = on_request
        self.batch_drop_every = batch_drop_every
        self.batch_max_lines = batch_max_lines
        self.batch_max_bytes = batch_max_bytes
        self.received = 0
        self.served: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.actions: collections.Counter[str] = collections.Counter()
        self.batch_lines = 0
        self.batch_served: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> LocalLLMServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-llm", daemon=True
        )
        self._thread.start()
        logger.info("local LLM server at %s", self.base_url)
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()  # wakes sleeping handlers (latency, hang) and batch threads
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # idle keep-alive connections would otherwise hold their threads
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _on_received(self, body: dict) -> int:
        with self._lock:
            self.received += 1
            count = self.received
        if self.on_request is not None:
            try:
                self.on_request(count, body)
            except Exception:
                logger.exception("on_request hook failed")
        return count

    def _on_served(self, body: dict, status: int) -> None:
        key = body_key(body) if status == 200 else None
        with self._lock:
            self.statuses[status] += 1
            if key is not None:
                self.served[key] += 1

    def _count_action(self, action: str) -> None:
        with self._lock:
            self.actions[action] += 1

    # -- files

    def _add_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        meta = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        with self._lock:
            self._files[meta["id"]] = (meta, data)
        return meta

    def file_content(self, file_id: str) -> bytes | None:
        with self._lock:
            entry = self._files.get(file_id)
        return None if entry is None else entry[1]

    # -- batches

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        """A copy of a batch object (None: unknown id)."""
        with self._lock:
            batch = self._batches.get(batch_id)
            return None if batch is None else json.loads(json.dumps(batch))

    def _create_batch(self, body: dict) -> tuple[int, dict[str, Any]]:
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return 400, error_body(
                    400, f"Missing required parameter: '{name}'.", "missing_required_parameter"
                )
        if body["endpoint"] != BATCH_ENDPOINT:
            return 400, error_body(
                400, f"The stand-in only batches {BATCH_ENDPOINT}, not {body['endpoint']!r}."
            )
        if body["completion_window"] != "24h":
            return 400, error_body(400, "completion_window must be '24h'.", "invalid_value")
        with self._lock:
            entry = self._files.get(body["input_file_id"])
        if entry is None:
            return 400, error_body(400, f"No such File object: {body['input_file_id']}", "invalid_value")
        if entry[0]["purpose"] != "batch":
            return 400, error_body(
                400, "The input file must be uploaded with purpose 'batch'.", "invalid_value"
            )
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": BATCH_ENDPOINT,
            "model": None,
            "errors": None,
            "input_file_id": body["input_file_id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 24 * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        with self._lock:
            self._batches[batch["id"]] = batch
            snapshot = json.loads(json.dumps(batch))
        threading.Thread(
            target=self._run_batch, args=(batch["id"], entry[1]), name=f"local-llm-{batch['id']}", daemon=True
        ).start()
        return 200, snapshot

    def _cancel_batch(self, batch_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                return 404, error_body(404, f"No batch found with id '{batch_id}'.", "batch_not_found")
            if batch["status"] in ("validating", "in_progress", "finalizing"):
                batch["status"] = "cancelling"
                batch["cancelling_at"] = int(time.time())
            elif batch["status"] not in ("cancelling", "cancelled"):
                return 409, error_body(409, f"Cannot cancel a batch with status '{batch['status']}'.")
            return 200, json.loads(json.dumps(batch))

    def _update_batch(self, batch_id: str, **changes: Any) -> str:
        with self._lock:
            batch = self._batches[batch_id]
            if batch["status"] == "cancelling" and "status" in changes:
                changes.pop("status")  # a cancel wins over the next step
            batch.update(changes)
            return batch["status"]

    def _validate_lines(self, data: bytes) -> tuple[list[dict], list[dict]]:
        """(requests, errors) of a batch input file, checked as OpenAI does before running anything."""
        if len(data) > self.batch_max_bytes:
            msg = f"The input file is {len(data)} bytes; a batch input file can be at most {self.batch_max_bytes}."
            return [], [{"code": "file_too_large", "message": msg, "param": None, "line": None}]
        lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
        if len(lines) > self.batch_max_lines:
            msg = (
                f"The input file has {len(lines)} requests; a batch can have at most {self.batch_max_lines}."
            )
            return [], [{"code": "too_many_requests", "message": msg, "param": None, "line": None}]
        if not lines:
            return [], [
                {"code": "empty_file", "message": "The input file is empty.", "param": None, "line": None}
            ]
        requests, errors, seen = [], [], set()
        for number, line in enumerate(lines, 1):
            try:
                request = json.loads(line)
            except ValueError:
                request = None
            if not isinstance(request, dict):
                errors.append(
                    {"code": "invalid_json_line", "message": "This line is not parseable as valid JSON."}
                )
            elif not isinstance(request.get("custom_id"), str) or not isinstance(request.get("body"), dict):
                errors.append(
                    {
                        "code": "missing_required_parameter",
                        "message": "Each line needs 'custom_id' and 'body'.",
                    }
                )
            elif request.get("method") != "POST" or request.get("url") != BATCH_ENDPOINT:
                errors.append(
                    {"code": "mismatched_endpoint", "message": f"Each line must be POST {BATCH_ENDPOINT}."}
                )
            elif request["custom_id"] in seen:
                errors.append({"code": "duplicate_custom_id", "message": "The custom_id is not unique."})
            else:
                seen.add(request["custom_id"])
                requests.append(request)
                continue
            errors[-1].update(param=None, line=number)
        return requests, errors

    def _run_batch(self, batch_id: str, data: bytes) -> None:
        requests, errors = self._validate_lines(data)
        if errors:
            self._update_batch(
                batch_id,
                status="failed",
                failed_at=int(time.time()),
                errors={"object": "list", "data": errors},
            )
            return
        total = len(requests)
        status = self._update_batch(
            batch_id,
            status="in_progress",
            in_progress_at=int(time.time()),
            request_counts={"total": total, "completed": 0, "failed": 0},
        )
        output, failed, dropped = [], [], 0
        for number, request in enumerate(requests, 1):
            if status == "cancelling" or self._stopping.is_set():
                break
            if self.batch_drop_every and number % self.batch_drop_every == 0:
                dropped += 1
                continue
            body = request["body"]
            reply = _call(self.responder, body)
            if reply.action is not None:  # no socket to reset: the line fails
                reply = Reply(
                    status=500, content=f"The server had an error ({reply.action}) processing the request."
                )
            line_id = f"batch_req_{uuid.uuid4().hex[:24]}"
            request_id = f"req_{uuid.uuid4().hex}"
            if reply.status == 200:
                response = {
                    "status_code": 200,
                    "request_id": request_id,
                    "body": chat_completion(body, reply),
                }
                output.append(
                    {"id": line_id, "custom_id": request["custom_id"], "response": response, "error": None}
                )
            else:
                response = {
                    "status_code": reply.status,
                    "request_id": request_id,
                    "body": error_body(reply.status, reply.content),
                }
                failed.append(
                    {"id": line_id, "custom_id": request["custom_id"], "response": response, "error": None}
                )
            with self._lock:
                self.batch_lines += 1
                if reply.status == 200:
                    self.batch_served[body_key(body)] += 1
            status = self._update_batch(
                batch_id, request_counts={"total": total, "completed": len(output), "failed": len(failed)}
            )
        cancelled = (
            self._update_batch(batch_id, status="finalizing", finalizing_at=int(time.time())) == "cancelling"
        )

        def write(lines: list[dict], kind: str) -> str | None:
            if not lines:
                return None
            data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
            return self._add_file(data, f"{batch_id}_{kind}.jsonl", "batch_output")["id"]

        now = int(time.time())
        files = {"output_file_id": write(output, "output"), "error_file_id": write(failed, "error")}
        with self._lock:
            batch = self._batches[batch_id]
            batch.update(files)
            if cancelled or batch["status"] == "cancelling":
                batch.update(status="cancelled", cancelled_at=now)
            elif dropped:
                batch.update(status="expired", expired_at=now)
            else:
                batch.update(status="completed", completed_at=now)
        logger.info(
            "batch %s: %d lines, %d ok, %d failed, %d dropped",
            batch_id,
            total,
            len(output),
            len(failed),
            dropped,
        )


# ---------------------------------------------------------------------------------------------------------
# Responders

_INTRO = re.compile(r"<object(\d+)>(?:\s?\[<region>\]|\s?<region>)?|\[<region>\]|<region>")


def _sentence_start(before: str) -> bool:
    return re.search(r"(?:\A|[.!?]\s+|\n\s*)\Z", before) is not None


class SceneResponder:
    """The deterministic rewriter of the synthetic shapes videos' records.

    ``scenes`` maps a record id (the payload's "id") to its objects in annotation order, each at least
    ``{"colour": ..., "shape": ...}`` (``swim data synth --format videorefer`` writes it as scenes.json). Object
    k gets the expression "the {colour} {noun}", its noun being its shape, or (when an earlier object of the
    record already uses that noun) the shape's fixed alternative (circle -> disc, square -> block, triangle ->
    wedge, diamond -> rhombus), so that the tagged words of a record differ. In the question, an introduction
    (``<objectN><region>``, ``<objectN> [<region>]``, ``<objectN> <region>``, a bare ``<region>``, or the first
    bare ``<objectN>`` of an object) becomes "the {colour} <ins>{noun}</ins>" and a later ``<objectN>`` "the
    <ins>{noun}</ins>" ("The" at a sentence start). The answer is null for ``answer_mode`` "keep"; otherwise
    its placeholders are replaced the same way and each "the {colour} {shape}" of an object becomes "the
    {colour} <ins>{noun}</ins>". Unknown ids get a 400; retry turns get the same (deterministic) reply.
    """

    def __init__(self, scenes: dict[str, list[dict]]) -> None:
        self.scenes = {str(k): list(v) for k, v in scenes.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> SceneResponder:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    def __call__(self, body: dict) -> Reply:
        try:
            payload = payload_from_messages(body.get("messages") or [])
        except (ValueError, TypeError, AttributeError) as e:
            return Reply(status=400, content=f"no record payload in the request: {e}")
        try:
            return Reply(content=json.dumps(self.rewrite(payload), ensure_ascii=False))
        except (KeyError, IndexError, ValueError) as e:
            return Reply(status=400, content=f"cannot rewrite record {payload.get('id')!r}: {e}")

    def rewrite(self, payload: dict) -> dict[str, Any]:
        """The reply object for one record payload (KeyError: unknown id; IndexError: an object not in the scene)."""
        record_id = str(payload.get("id"))
        if record_id not in self.scenes:
            raise KeyError(f"unknown record id {record_id!r}")
        scene = self.scenes[record_id]
        objects = payload.get("objects") or [
            {"object": k, "placeholder": "<region>"} for k in range(len(scene))
        ]
        by_number: dict[int, int] = {}
        regions: list[int] = []
        for entry in objects:
            k = int(entry["object"])
            if k >= len(scene):
                raise IndexError(
                    f"object {k} of record {record_id!r} is not in its scene ({len(scene)} objects)"
                )
            m = re.fullmatch(r"<object(\d+)>", str(entry.get("placeholder")))
            if m:
                by_number[int(m.group(1))] = k
            else:
                regions.append(k)
        used: list[str] = []
        described = []
        for k in range(len(scene)):
            shape, colour = str(scene[k]["shape"]), str(scene[k]["colour"])
            candidates = [shape, ALTERNATIVE_NOUN.get(shape, shape), *_FALLBACK_NOUNS]
            noun = next(c for c in candidates if c not in used)
            used.append(noun)
            described.append((colour, shape, noun))
        listed = [int(entry["object"]) for entry in objects]

        introduced: set[int] = set()
        question = self._replace(
            str(payload.get("question") or ""), by_number, regions, described, introduced
        )
        answer = payload.get("answer")
        if payload.get("answer_mode") == "keep" or answer is None:
            answer = None
        else:
            answer = self._replace(str(answer), by_number, regions, described, introduced)
            for k in listed:
                colour, shape, noun = described[k]
                answer = re.sub(
                    rf"\b([Tt]he) {re.escape(colour)} {re.escape(shape)}\b",
                    rf"\1 {colour} <ins>{noun}</ins>",
                    answer,
                )
        return {
            "objects": [
                {
                    "object": k,
                    "expression": f"the {described[k][0]} {described[k][2]}",
                    "head_noun": described[k][2],
                }
                for k in listed
            ],
            "question": question,
            "answer": answer,
        }

    @staticmethod
    def _replace(
        text: str,
        by_number: dict[int, int],
        regions: list[int],
        described: list[tuple[str, str, str]],
        introduced: set[int],
    ) -> str:
        region_iter = iter(regions)

        def sub(m: re.Match) -> str:
            token = m.group(0)
            if m.group(1) is not None:
                n = int(m.group(1))
                if n not in by_number:
                    raise ValueError(f"<object{n}> is not in the record's object list")
                k = by_number[n]
                full = "<region>" in token or k not in introduced
            else:
                k = next(region_iter, None)
                if k is None:
                    raise ValueError("more <region> placeholders than <region> objects")
                full = True
            introduced.add(k)
            colour, _, noun = described[k]
            before = m.string[: m.start()]
            phrase = f"{colour} <ins>{noun}</ins>" if full else f"<ins>{noun}</ins>"
            if re.search(r"\b[Tt]he $", before):  # "the <object0>": keep the text's determiner
                return phrase
            return ("The " if _sentence_start(before) else "the ") + phrase

        return _INTRO.sub(sub, text)


CONTENT_FAULTS = (
    "leak_region",
    "leak_object",
    "tag_adjective",
    "tag_determiner",
    "inconsistent_tags",
    "swapped_order",
    "changed_facts",
    "mask_language",
    "invalid_json",
    "truncated",
    "refusal",
)
TRANSPORT_FAULTS = ("http_429", "http_500", "reset", "hang")
FAULTS = ("ok", *CONTENT_FAULTS, *TRANSPORT_FAULTS)
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
_SWAP_WORDS = {
    "left": "right",
    "right": "left",
    "up": "down",
    "down": "up",
    "upward": "downward",
    "downward": "upward",
    "top": "bottom",
    "bottom": "top",
    "upper": "lower",
    "lower": "upper",
    "clockwise": "counterclockwise",
    "counterclockwise": "clockwise",
    "faster": "slower",
    "slower": "faster",
}
_CHANGED_WORD = "elsewhere"


class FaultResponder:
    """Wraps a responder to inject faults, per record id (the payload's "id").

    ``faults[id]`` is consumed one fault per chat request (or batch line) received for that record; once it is
    exhausted (and for ids without faults, and for "ok") the base reply is sent unchanged. Thread-safe.

    Content faults: status 200, the base reply (which must be the JSON reply object) with the smallest change
    that shows one defect:

    - ``leak_region``: "<region>" left in the question, right after the first tagged expression;
    - ``leak_object``: "<object1>" left in the question, right after the first tagged expression;
    - ``tag_adjective``: object 0's adjective tagged instead of its noun at every mention ("the <ins>red</ins>
      circle") and given as its head_noun;
    - ``tag_determiner``: object 0's "the" tagged instead of its noun ("<ins>the</ins> red circle"), head_noun
      "the";
    - ``inconsistent_tags``: object 0's last mention (question, then answer) tagged "<ins>shape</ins>" instead of
      its noun; with a single mention, " (the <ins>shape</ins>)" is appended to the answer (or, when it is
      null, the question) so that there is a second mention;
    - ``swapped_order``: the first mentions of objects 0 and 1 in the question swapped, so that object 1 is
      mentioned first (records with fewer than two objects: unchanged);
    - ``changed_facts``: the answer's facts changed: its first direction word swapped (left <-> right, up <->
      down, top <-> bottom, ...), or else its longest untagged word replaced by "elsewhere"; with a null answer
      (answer_mode keep) the same change in the question's untagged words;
    - ``mask_language``: ", outlined by the red contour," added after the first tagged expression of the
      question;
    - ``invalid_json``: the content not parseable: its last 10 characters removed and double quotes made single;
    - ``truncated``: finish_reason "length" and the content cut to its first half;
    - ``refusal``: content and refusal both "I'm sorry, but I can't help with that.".

    Transport faults (the base responder is not called):

    - ``http_429``: status 429 with header ``Retry-After: 1`` and OpenAI's rate-limit error JSON;
    - ``http_500``: status 500 with a server_error JSON;
    - ``reset``: the connection closed at once (RST) without any reply;
    - ``hang``: nothing sent for ``hang_s`` seconds, then the connection closed.
    """

    def __init__(self, base: Responder, faults: dict[str, list[str]], *, hang_s: float = 5.0) -> None:
        unknown = sorted({f for fs in faults.values() for f in fs} - set(FAULTS))
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {list(FAULTS)}")
        self.base = base
        self.hang_s = hang_s
        self._queues = {str(k): collections.deque(v) for k, v in faults.items()}
        self._lock = threading.Lock()

    def remaining(self, record_id: str) -> list[str]:
        with self._lock:
            return list(self._queues.get(str(record_id), ()))

    def _next_fault(self, body: dict) -> str:
        try:
            record_id = str(payload_from_messages(body.get("messages") or []).get("id"))
        except (ValueError, TypeError, AttributeError):
            return "ok"
        with self._lock:
            queue = self._queues.get(record_id)
            return queue.popleft() if queue else "ok"

    def __call__(self, body: dict) -> Reply:
        fault = self._next_fault(body)
        if fault == "http_429":
            message = "Rate limit reached for requests (local stand-in). Please try again in 1s."
            return Reply(status=429, content=message, headers={"Retry-After": "1"})
        if fault == "http_500":
            return Reply(status=500, content="The server had an error while processing your request.")
        if fault == "reset":
            return Reply(action="reset")
        if fault == "hang":
            return Reply(action="hang", delay_s=self.hang_s)
        reply = self.base(body)
        if fault == "ok" or reply.status != 200 or reply.content is None:
            return reply
        return apply_content_fault(fault, reply)


def apply_content_fault(fault: str, reply: Reply) -> Reply:
    """The base reply with one content fault (see `FaultResponder`)."""
    content = reply.content or ""
    if fault == "invalid_json":
        return replace(reply, content=content[:-10].replace('"', "'"))
    if fault == "truncated":
        return replace(reply, content=content[: len(content) // 2], finish_reason="length")
    if fault == "refusal":
        return replace(reply, content=REFUSAL_TEXT, refusal=REFUSAL_TEXT)
    try:
        obj = json.loads(content)
    except ValueError:
        return reply
    if not isinstance(obj, dict) or not obj.get("objects"):
        return reply
    _CONTENT_FAULTS[fault](obj)
    return replace(reply, content=json.dumps(obj, ensure_ascii=False))


def _insert_after_first_tag(text: str, insert: str) -> str:
    i = text.find("</ins>")
    return text + insert if i < 0 else text[: i + 6] + insert + text[i + 6 :]


def _object0(obj: dict) -> tuple[dict, str]:
    first = obj["objects"][0]
    return first, str(first["head_noun"])


def _fault_leak_region(obj: dict) -> None:
    obj["question"] = _insert_after_first_tag(obj["question"], "<region>")


def _fault_leak_object(obj: dict) -> None:
    obj["question"] = _insert_after_first_tag(obj["question"], "<object1>")


def _texts(obj: dict) -> list[str]:
    return ["question"] + (["answer"] if isinstance(obj.get("answer"), str) else [])


def _fault_tag_adjective(obj: dict) -> None:
    first, noun = _object0(obj)
    words = str(first["expression"]).split()
    adjectives = (
        [w for w in words[: words.index(noun)] if w.lower() not in ("the", "a", "an")]
        if noun in words
        else []
    )
    adjective = adjectives[-1] if adjectives else "small"
    tagged = re.escape(f"<ins>{noun}</ins>")
    for name in _texts(obj):
        text = re.sub(rf"\b{re.escape(adjective)} {tagged}", f"<ins>{adjective}</ins> {noun}", obj[name])
        obj[name] = re.sub(tagged, f"<ins>{adjective}</ins> {noun}", text)
    first["head_noun"] = adjective


def _fault_tag_determiner(obj: dict) -> None:
    first, noun = _object0(obj)
    pattern = rf"\b([Tt]he) ((?:(?![Tt]he\b)[\w-]+ ){{0,3}}?)<ins>{re.escape(noun)}</ins>"
    for name in _texts(obj):
        obj[name] = re.sub(pattern, rf"<ins>\1</ins> \2{noun}", obj[name])
    first["head_noun"] = "the"


def _fault_inconsistent_tags(obj: dict) -> None:
    _, noun = _object0(obj)
    other = "figure" if noun == "shape" else "shape"
    tag = f"<ins>{noun}</ins>"
    mentions = [(name, m.start()) for name in _texts(obj) for m in re.finditer(re.escape(tag), obj[name])]
    if len(mentions) >= 2:
        name, i = mentions[-1]
        obj[name] = obj[name][:i] + f"<ins>{other}</ins>" + obj[name][i + len(tag) :]
    else:
        name = _texts(obj)[-1]
        obj[name] = obj[name].rstrip() + f" (the <ins>{other}</ins>)"


def _first_mention(text: str, entry: dict) -> tuple[int, int] | None:
    noun = str(entry["head_noun"])
    expression = str(entry["expression"])
    i = expression.rfind(noun)
    candidates = []
    if i >= 0:
        candidates.append(expression[:i] + f"<ins>{noun}</ins>" + expression[i + len(noun) :])
    candidates += [f"the <ins>{noun}</ins>", f"<ins>{noun}</ins>"]
    for candidate in candidates:
        m = re.search(re.escape(candidate), text, re.I)
        if m:
            return m.span()
    return None


def _fault_swapped_order(obj: dict) -> None:
    if len(obj["objects"]) < 2:
        logger.warning("swapped_order needs two objects; the reply is unchanged")
        return
    text = obj["question"]
    a, b = _first_mention(text, obj["objects"][0]), _first_mention(text, obj["objects"][1])
    if a is None or b is None or a[1] > b[0]:
        logger.warning("swapped_order: object 0 is not mentioned before object 1; the reply is unchanged")
        return

    def placed(span_text: str, original: str) -> str:  # keep the case of the first letter at each position
        return (span_text[:1].upper() if original[:1].isupper() else span_text[:1].lower()) + span_text[1:]

    first, second = text[a[0] : a[1]], text[b[0] : b[1]]
    obj["question"] = (
        text[: a[0]] + placed(second, first) + text[a[1] : b[0]] + placed(first, second) + text[b[1] :]
    )


def _change_facts(text: str) -> str:
    protected = [
        m.span() for m in re.finditer(r"\b[Tt]he (?:[\w-]+ )?<ins>[^<]*</ins>|<ins>[^<]*</ins>|<[^>]*>", text)
    ]
    words = [m for m in re.finditer(r"[A-Za-z]+", text) if not any(s <= m.start() < e for s, e in protected)]
    for m in words:
        swap = _SWAP_WORDS.get(m.group(0).lower())
        if swap:
            new = swap.capitalize() if m.group(0)[0].isupper() else swap
            return text[: m.start()] + new + text[m.end() :]
    if not words:
        return text + f" {_CHANGED_WORD}"
    m = max(words, key=lambda w: len(w.group(0)))
    return text[: m.start()] + _CHANGED_WORD + text[m.end() :]


def _fault_changed_facts(obj: dict) -> None:
    name = "answer" if isinstance(obj.get("answer"), str) else "question"
    obj[name] = _change_facts(obj[name])


def _fault_mask_language(obj: dict) -> None:
    obj["question"] = _insert_after_first_tag(obj["question"], ", outlined by the red contour,")


_CONTENT_FAULTS: dict[str, Callable[[dict], None]] = {
    "leak_region": _fault_leak_region,
    "leak_object": _fault_leak_object,
    "tag_adjective": _fault_tag_adjective,
    "tag_determiner": _fault_tag_determiner,
    "inconsistent_tags": _fault_inconsistent_tags,
    "swapped_order": _fault_swapped_order,
    "changed_facts": _fault_changed_facts,
    "mask_language": _fault_mask_language,
}


# ---------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swim.data.nl_refer.local_llm",
        description="Serve the deterministic SceneResponder as an OpenAI-compatible endpoint on 127.0.0.1.",
    )
    parser.add_argument("--scenes", required=True, type=Path, help="scenes.json (record id -> its objects)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every chat reply")
    parser.add_argument("--faults", type=Path, help="JSON: record id -> list of faults (see FaultResponder)")
    parser.add_argument("--hang-s", type=float, default=5.0, help="how long the 'hang' fault sends nothing")
    parser.add_argument("--batch-drop-every", type=int, help="drop every k-th line of each batch (expired)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    responder: Responder = SceneResponder.from_file(args.scenes)
    if args.faults is not None:
        faults = json.loads(args.faults.read_text(encoding="utf-8"))
        responder = FaultResponder(responder, faults, hang_s=args.hang_s)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = LocalLLMServer(
        responder,
        host=args.host,
        port=args.port,
        latency_s=args.latency,
        batch_drop_every=args.batch_drop_every,
    )
    with server:
        print(f"LOCAL_LLM_URL={server.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    logger.info("stopped: %d chat requests received, statuses %s", server.received, dict(server.statuses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
