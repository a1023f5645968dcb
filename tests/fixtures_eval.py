"""Shared helpers for the evaluation tests: a tiny checkpoint that says something, small benches, and a local
OpenAI-compatible judge server on loopback."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from swim.data.synth.shapes import SynthConfig, generate
from swim.eval.judge import DIMENSIONS

# Clips stay 56x56, 4 frames (2 temporal groups x 4 merged tokens): fast on CPU.
SMALL_VIDEO_FLAGS = [
    "--num-frames", "4", "--max-frames", "4", "--min-pixels", str(28 * 28), "--max-pixels", str(56 * 56),
    "--total-pixels", str(56 * 56 * 8),
]  # fmt: skip
CPU_FLAGS = ["--dtype", "fp32", "--device", "cpu", "--decode-workers", "0"]


def talkative_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a tiny checkpoint with large random weights: the default init makes every answer the same
    newline token, which would hide batching and sharding bugs."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if (dst / "config.json").exists():
        return dst
    shutil.copytree(src, dst)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(dst)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3, generator=gen)
    model.save_pretrained(dst)
    return dst


def synth_benches(out: Path, n_q: int = 5, n_d: int = 3) -> dict[str, Path]:
    """`swim data synth`-style bench_q.json / bench_d.json with videos under out/videos."""
    cfg = SynthConfig(size=56, object_size=14, speed=2.0)
    return generate(out, cfg, seed=0, counts={"bench_q": n_q, "bench_d": n_d})


def append_records(path: Path, records: list) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data + records))


def judge_reply(reference: str, prediction: str) -> str:
    """Deterministic well-formed judge reply (scores depend on the lengths), or junk for 'UNPARSABLE'."""
    if "UNPARSABLE" in reference:
        return "I am unable to rate this description."
    lines = []
    for i, dim in enumerate(DIMENSIONS, 1):
        lines += [f"{i}. {dim}: {(len(reference) + len(prediction) + i) % 6}", "Explanation: fine."]
    return "\n".join(lines)


class JudgeServer:
    """`/v1/chat/completions` on 127.0.0.1, counting requests. Modes (set the attributes):

    - `fail_next`: answer that many requests with HTTP `fail_status` first (transient errors);
    - `hang_at`: the request with that 1-based number blocks until `release` is set (to kill a client
      mid-run); it is never answered;
    - `max_requests`: hard bound; further requests get 503 and are recorded in `over_limit`.
    """

    def __init__(self, max_requests: int = 200):
        self.lock = threading.Lock()
        self.requests = 0
        self.answered: list[str] = []  # user prompts answered with 200
        self.fail_next = 0
        self.fail_status = 500
        self.hang_at: int | None = None
        self.release = threading.Event()
        self.hanging = threading.Event()
        self.max_requests = max_requests
        self.over_limit = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests += 1
                    n = server.requests
                    over = n > server.max_requests
                    fail = server.fail_next > 0
                    if fail:
                        server.fail_next -= 1
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if over:
                    server.over_limit += 1
                    return self._send(503, {"error": {"message": "request bound exceeded"}})
                if fail:
                    return self._send(server.fail_status, {"error": {"message": "injected failure"}})
                if server.hang_at is not None and n == server.hang_at:
                    server.hanging.set()
                    server.release.wait(60)
                    return  # never answered: the client is dead by now
                user = body["messages"][-1]["content"]
                reference = user.split("##Correct answer: ", 1)[1].split("\n##Predicted answer: ", 1)[0]
                prediction = user.split("\n##Predicted answer: ", 1)[1].rstrip("\n")
                with server.lock:
                    server.answered.append(user)
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{n}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", "judge"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {
                                    "role": "assistant",
                                    "content": judge_reply(reference, prediction),
                                },
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
