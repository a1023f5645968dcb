"""LLM back-ends for ``swim data build``: one request body in, one logged reply out.

- `OpenAIBackend` (``--backend openai``): any OpenAI-compatible chat endpoint (OpenAI, ``vllm serve``, a local
  stand-in), async with bounded concurrency. 429, 408/409/425, 5xx, timeouts and dropped connections are retried
  with exponential backoff (jittered), honouring ``Retry-After``; authentication / permission / not-found errors
  stop the run (`FatalLLMError`); after the last retry the request fails (`RequestFailed`) and the record is
  reported, never cached, so that a rerun tries it again.
- `BatchBackend` (``--backend batch``): the OpenAI Batch API. Pending requests are written to JSONL files within
  its limits (50,000 lines, 200 MB per file), uploaded and submitted; every submitted batch is recorded in
  ``OUT/batches.jsonl`` before polling, so a killed run polls the same batches again instead of paying twice.
  Output and error files are ingested by ``custom_id`` (= the request id); what a batch did not answer (expired,
  failed lines) is simply still missing from the response log and goes into the next submission.
- `VLLMBackend` (``--backend vllm``): offline ``vllm.LLM.chat`` with JSON-schema guided decoding, for a local
  model on this machine's GPUs; only where ``vllm`` imports.

A reply is stored as the dict `reply_entry` returns: the content, finish reason, refusal, token usage, latency,
the number of transport retries, and the full response JSON.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 200 * 1024 * 1024
_TRANSIENT_STATUS = (408, 409, 425, 429)


class FatalLLMError(RuntimeError):
    """The endpoint refuses this client (key, permission, model name): stop, do not skip records."""


class RequestFailed(RuntimeError):
    """One request failed after every retry (the record is reported; nothing is cached)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 120.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry ``attempt`` (1-based): the server's Retry-After if given, else backoff."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max_s)
        base = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)


def retry_after_seconds(headers: Any) -> float | None:
    """``Retry-After`` (seconds, or an HTTP date) -> seconds; None when absent or unreadable."""
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def reply_entry(completion: dict[str, Any], latency_s: float, retries: int) -> dict[str, Any]:
    """The fields the response log keeps from a chat.completion JSON."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = completion.get("usage") or {}
    return {
        "content": message.get("content"),
        "refusal": message.get("refusal"),
        "finish_reason": choice.get("finish_reason"),
        "usage": {
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
        },
        "latency_s": round(latency_s, 4),
        "retries": retries,
        "response": completion,
    }


def _quiet_http_loggers() -> None:
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def is_transient(e: Exception) -> bool:
    """An OpenAI-client error worth retrying: connection, timeout, 429, 408/409/425, 5xx."""
    import openai

    if isinstance(e, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError)):
        return True
    if isinstance(e, openai.APIStatusError):
        return e.status_code in _TRANSIENT_STATUS or e.status_code >= 500
    return False


class OpenAIBackend:
    """Async chat completions with our own retries (counted, logged, bounded)."""

    name = "openai"

    def __init__(
        self, base_url: str | None, api_key: str, *, concurrency: int = 16, retry: RetryPolicy = RetryPolicy()
    ):
        import openai

        _quiet_http_loggers()
        self.retry = retry
        self.concurrency = concurrency
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=retry.timeout_s, max_retries=0
        )
        self.transport_retries = 0
        self.failures = 0

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        import openai

        attempt = 0
        while True:
            start = time.perf_counter()
            try:
                completion = await self.client.chat.completions.create(**body)
                return reply_entry(completion.model_dump(), time.perf_counter() - start, attempt)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise FatalLLMError(
                    f"the endpoint refused the request: {type(e).__name__} (HTTP {e.status_code}): {e}"
                ) from e
            except Exception as e:
                if not is_transient(e) or attempt >= self.retry.max_retries:
                    self.failures += 1
                    raise RequestFailed(f"{type(e).__name__}: {e}"[:300]) from e
                attempt += 1
                self.transport_retries += 1
                headers = getattr(getattr(e, "response", None), "headers", None)
                delay = self.retry.delay(attempt, retry_after_seconds(headers))
                logger.debug(
                    "request failed (%s); retry %d/%d in %.2f s",
                    type(e).__name__,
                    attempt,
                    self.retry.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self.client.close()


# ----------------------------------------------------------------------------------------------------------
# Batch API


def split_batches(lines: Iterable[bytes], max_lines: int = BATCH_MAX_LINES, max_bytes: int = BATCH_MAX_BYTES):
    """Group encoded JSONL lines into files of at most ``max_lines`` lines and ``max_bytes`` bytes."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if len(line) > max_bytes:
            raise ValueError(
                f"one batch line is {len(line)} bytes, more than the {max_bytes}-byte file limit"
            )
        if chunk and (len(chunk) >= max_lines or size + len(line) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield chunk


class BatchBackend:
    """Submit pending requests as OpenAI batches, poll them, ingest their output and error files."""

    name = "batch"
    DONE = ("completed", "expired", "failed", "cancelled")

    def __init__(
        self,
        base_url: str | None,
        api_key: str,
        state_path: Path,
        *,
        poll_s: float = 30.0,
        max_lines: int = BATCH_MAX_LINES,
        max_bytes: int = BATCH_MAX_BYTES,
        completion_window: str = "24h",
    ):
        import openai

        _quiet_http_loggers()
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=5)
        self.state_path = Path(state_path)
        self.poll_s, self.max_lines, self.max_bytes = poll_s, max_lines, max_bytes
        self.completion_window = completion_window

    def open_batches(self, ingested: set[str]) -> list[str]:
        """Batch ids submitted by earlier runs whose results were not ingested yet."""
        if not self.state_path.exists():
            return []
        ids = []
        for line in self.state_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("batch_id") and entry["batch_id"] not in ingested:
                ids.append(entry["batch_id"])
        return list(dict.fromkeys(ids))

    def _record(self, entry: dict[str, Any]) -> None:
        with self.state_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def submit(self, requests: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
        """Upload and submit (request id, body) pairs; returns the batch ids (recorded before returning)."""
        lines = (
            (
                json.dumps({"custom_id": rid, "method": "POST", "url": "/v1/chat/completions", "body": body})
                + "\n"
            ).encode()
            for rid, body in requests
        )
        batch_ids = []
        for chunk in split_batches(lines, self.max_lines, self.max_bytes):
            upload = self.client.files.create(
                file=("requests.jsonl", io.BytesIO(b"".join(chunk))), purpose="batch"
            )
            batch = self.client.batches.create(
                input_file_id=upload.id,
                endpoint="/v1/chat/completions",
                completion_window=self.completion_window,
            )
            self._record(
                {
                    "batch_id": batch.id,
                    "input_file_id": upload.id,
                    "lines": len(chunk),
                    "submitted": time.time(),
                }
            )
            logger.info("submitted batch %s (%d requests)", batch.id, len(chunk))
            batch_ids.append(batch.id)
        return batch_ids

    def wait(self, batch_ids: list[str], on_update: Callable[[str, Any], None] | None = None) -> list[Any]:
        """Poll until every batch is in a final state; returns the batch objects."""
        pending, finished = list(batch_ids), []
        while pending:
            still = []
            for batch_id in pending:
                batch = self.client.batches.retrieve(batch_id)
                if on_update is not None:
                    on_update(batch_id, batch)
                (finished if batch.status in self.DONE else still).append(batch)
            pending = [b.id for b in still]
            if pending:
                time.sleep(self.poll_s)
        return finished

    def results(self, batch) -> Iterable[tuple[str, dict[str, Any] | None, str | None]]:
        """(custom_id, reply entry or None, error) for every line of the batch's output and error files."""
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            text = self.client.files.content(file_id).text
            for line in text.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                response = item.get("response") or {}
                if response.get("status_code") == 200 and not item.get("error"):
                    yield item["custom_id"], reply_entry(response.get("body") or {}, 0.0, 0), None
                else:
                    error = item.get("error") or (response.get("body") or {}).get("error") or response
                    yield item["custom_id"], None, json.dumps(error)[:300]
        if batch.status in ("failed",) and getattr(batch, "errors", None):
            logger.warning("batch %s failed: %s", batch.id, batch.errors)

    def mark_ingested(self, batch_id: str) -> None:
        self._record({"ingested": batch_id})

    def ingested(self) -> set[str]:
        if not self.state_path.exists():
            return set()
        out = set()
        for line in self.state_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("ingested"):
                out.add(entry["ingested"])
        return out


# ----------------------------------------------------------------------------------------------------------
# vLLM offline


class VLLMBackend:
    """``vllm.LLM.chat`` over a list of request bodies, with the reply schema as guided JSON."""

    name = "vllm"

    def __init__(self, model: str, *, schema: dict[str, Any], **llm_kwargs: Any):
        try:
            import vllm
        except ImportError as e:
            raise FatalLLMError(
                "--backend vllm needs the vllm package (pip install vllm) on a GPU machine"
            ) from e
        self.vllm = vllm
        self.schema = schema
        self.llm = vllm.LLM(model=model, **llm_kwargs)

    def sampling_params(self, body: dict[str, Any]):
        vllm = self.vllm
        kwargs = {"temperature": body.get("temperature", 0.0), "max_tokens": body.get("max_tokens", 1024)}
        if body.get("seed") is not None:
            kwargs["seed"] = body["seed"]
        if "response_format" in body:
            sampling = getattr(vllm, "sampling_params", None)
            structured = getattr(sampling, "StructuredOutputsParams", None)
            guided = getattr(sampling, "GuidedDecodingParams", None)
            if structured is not None:  # vllm >= 0.10
                kwargs["structured_outputs"] = structured(json=self.schema)
            elif guided is not None:
                kwargs["guided_decoding"] = guided(json=self.schema)
        return vllm.SamplingParams(**kwargs)

    def complete_all(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not bodies:
            return []
        start = time.perf_counter()
        outputs = self.llm.chat(
            [b["messages"] for b in bodies], [self.sampling_params(b) for b in bodies], use_tqdm=True
        )
        per_request = (time.perf_counter() - start) / len(bodies)
        entries = []
        for body, out in zip(bodies, outputs):
            gen = out.outputs[0]
            completion = {
                "model": body["model"],
                "choices": [
                    {
                        "message": {"role": "assistant", "content": gen.text},
                        "finish_reason": gen.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": len(out.prompt_token_ids or []),
                    "completion_tokens": len(gen.token_ids or []),
                },
            }
            entries.append(reply_entry(completion, per_request, 0))
        return entries
