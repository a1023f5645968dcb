"""Cost of the attention supervision: one training step (forward + backward), three ways, in one run.

    python benchmarks/attention_overhead.py [--lengths 1024 2048 4096] [--repeats 3] [--json out.json]
    swim bench overhead ...                  # the same

Columns, on a mid-size random Qwen2.5-VL (hidden 512, 8 layers, GQA 8/2 heads), ~80% video tokens:
- plain: next-token loss only (stock forward);
- swim:  ours — next-token + KL grounding loss on the default supervised layers ([1, 2, 3, 4, 6, 7] of 8),
         recomputed only for the tagged rows;
- reference-style: the official release's capture pattern — attention rows of *every* layer for *every*
         position after the video, softmax kept for backward — feeding the same loss.
Each (method, length) runs in a fresh subprocess, so peak memory is that process's peak resident set above its
state before the first step (on CUDA: `max_memory_allocated`). Step time is the median over `--repeats` steps
after one warm-up step. Ratios are to `plain` at the same length.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time

logger = logging.getLogger("swim.bench.overhead")

METHODS = ("plain", "swim", "reference-style")
VIDEO_FRACTION = 0.8
N_QUERIES = 8


def build_model(device: str):
    import torch
    from transformers import Qwen2_5_VLConfig

    from swim.modeling.model import SwimQwen2_5_VLForConditionalGeneration
    from swim.tiny import tiny_config_dict

    config = tiny_config_dict(
        1024,
        num_hidden_layers=8,
        hidden_size=512,
        intermediate_size=1376,
        num_attention_heads=8,
        num_key_value_heads=2,
        vision_hidden_size=32,
    )
    torch.manual_seed(0)
    model = SwimQwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).to(device).train()
    model.model.visual.requires_grad_(False)  # frozen, as in training
    return model


def build_batch(model, length: int, device: str) -> dict:
    """One sample of ~`length` tokens, 80% of them video tokens (16x20 merged grid per temporal group)."""
    from swim.testing import video_batch

    per_group = 10 * 20
    groups = max(1, round(length * VIDEO_FRACTION / per_group))
    text = length - groups * per_group - 12
    spec = dict(
        videos=[(groups, 20, 40)],
        text=text,
        queries=[(10 + 7 * i, i % 2) for i in range(N_QUERIES)],
        objects=2,
    )
    batch = video_batch(model.config, [spec])
    return {k: _to(v, device) for k, v in batch.items()}


def _to(value, device):
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


def reference_style_loss(model, batch):
    """Every layer, every row after the video: the capture pattern of the official release (kept in the graph)."""
    import torch

    from swim.modeling.capture import AttentionProbe
    from swim.modeling.objective import grounding_loss

    n_layers = model.config.text_config.num_hidden_layers
    probe = AttentionProbe(model, list(range(n_layers)), checkpoint_recompute=False)
    input_ids = batch["input_ids"]
    video_end = int((input_ids[0] == model.config.vision_end_token_id).nonzero().max())
    all_rows = torch.arange(video_end, input_ids.shape[1], device=input_ids.device)[None]
    inputs = {k: v for k, v in batch.items() if k != "grounding"}
    with probe.capture():
        out = model(**inputs)
    rows = probe.rows(all_rows, batch["attention_mask"])  # [layers, 1, heads, rows, L] materialised
    loss_attn, _ = grounding_loss(
        probe, batch["grounding"], input_ids, batch["attention_mask"], model.config.video_token_id,
        model.grounding_config,
    )  # fmt: skip
    probe.remove()
    return out.loss + loss_attn + 0 * rows.sum()


def run_one(method: str, length: int, repeats: int, device: str, checkpointing: bool) -> dict:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model(device)
    if checkpointing:
        model.activation_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = build_batch(model, length, device)
    grounding = batch.pop("grounding")

    def step():
        model.zero_grad(set_to_none=True)
        if method == "plain":
            loss = model(**batch).loss
        elif method == "swim":
            loss = model(**batch, grounding=grounding).loss
        else:
            loss = reference_style_loss(model, {**batch, "grounding": grounding})
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _max_rss_bytes()) - base
    return {
        "method": method,
        "length": int(batch["input_ids"].shape[1]),
        "video_tokens": int((batch["input_ids"] == model.config.video_token_id).sum()),
        "step_s": statistics.median(times),
        "peak_mb": peak / 2**20,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_table(rows: list[dict]) -> str:
    base = {r["length"]: r for r in rows if r["method"] == "plain"}
    lines = [
        f"{'tokens':>6} {'video':>6} {'method':<16} {'step (s)':>9} {'x plain':>8} {'peak (MB)':>10} {'x plain':>8}",
    ]
    for r in rows:
        b = base[r["length"]]
        lines.append(
            f"{r['length']:>6} {r['video_tokens']:>6} {r['method']:<16} {r['step_s']:>9.3f} "
            f"{r['step_s'] / b['step_s']:>8.3f} {r['peak_mb']:>10.1f} {r['peak_mb'] / b['peak_mb']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.worker:
        row = run_one(args.worker[0], int(args.worker[1]), args.repeats, args.device, args.checkpointing)
        print("RESULT " + json.dumps(row))
        return

    rows = []
    for length in args.lengths:
        for method in args.methods:
            cmd = [sys.executable, "-m", "swim.bench.overhead", "--worker", method, str(length),
                   "--repeats", str(args.repeats), "--device", args.device]  # fmt: skip
            if args.checkpointing:
                cmd.append("--checkpointing")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not result:
                raise RuntimeError(f"{method} at {length} tokens failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(result[-1].removeprefix("RESULT ")))
            logger.info("%s @ %d: %.3f s, %.0f MB", method, length, rows[-1]["step_s"], rows[-1]["peak_mb"])
    table = format_table(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "checkpointing": args.checkpointing, "device": args.device}, f, indent=2)


if __name__ == "__main__":
    main()
