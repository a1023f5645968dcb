"""Cost of the attention supervision: one training step (forward + backward), three ways, in one run.

    python benchmarks/attention_overhead.py [--lengths 1024 2048 4096] [--repeats 3] [--json out.json]
    swim bench overhead ...                  # the same

Columns, on a mid-size random Qwen2.5-VL (hidden 512, 8 layers, GQA 8/2 heads), ~80% video tokens:
- plain: next-token loss only (stock forward);
- swim:  ours — next-token + KL grounding loss on the default supervised layers ([1, 2, 3, 4, 6, 7] of 8),
         recomputed only for the tagged rows;
- reference-style: the official release's capture pattern — attention rows of *every* layer for *every*
         position after the video, softmax kept for backward — feeding the same loss.
Step time: the median over `--repeats` steps after a warm-up, the methods interleaved so that machine drift
hits them alike. Peak memory: the peak of live tensor bytes during one step, weights included (CUDA:
`max_memory_allocated`; CPU: the profiler's memory timeline, since the CPU allocator records no peak and the
resident set mostly measures the allocator's caching). Ratios are to `plain` at the same length.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

logger = logging.getLogger("swim.bench.overhead")

METHODS = ("plain", "swim", "reference-style")
VIDEO_FRACTION = 0.8
N_QUERIES = 8


def build_model(device: str, dtype: str = "float32", family: str = "qwen2_5_vl"):
    import torch

    from swim.modeling.model import swim_model_class
    from swim.tiny import tiny_config

    config = tiny_config(
        1024,
        family,
        num_hidden_layers=8,
        hidden_size=512,
        intermediate_size=1376,
        num_attention_heads=8,
        num_key_value_heads=2,
        vision_hidden_size=32,
    )
    torch.manual_seed(0)
    model = swim_model_class(config)(config)
    model = model.to(device=device, dtype=getattr(torch, dtype)).train()
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
    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(model.dtype)
    return {k: _to(v, device) for k, v in batch.items()}


def _to(value, device):
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


def reference_style_loss(model, batch):
    """Every layer, every row after the video: the capture pattern of the official release (kept in the graph)."""
    import torch

    from swim.modeling.capture import AttentionProbe, find_decoder_layers, vision_token_ids
    from swim.modeling.objective import grounding_loss

    probe = AttentionProbe(model, list(find_decoder_layers(model)), checkpoint_recompute=False)
    input_ids = batch["input_ids"]
    video_end = int((input_ids[0] == model.config.vision_end_token_id).nonzero().max())
    all_rows = torch.arange(video_end, input_ids.shape[1], device=input_ids.device)[None]
    inputs = {k: v for k, v in batch.items() if k != "grounding"}
    with probe.capture():  # every row of every layer, as the release
        out = model(**inputs)
    rows = probe.rows(all_rows, batch["attention_mask"])  # [layers, 1, heads, rows, L] materialised
    loss_attn, _ = grounding_loss(
        probe, batch["grounding"], input_ids, batch["attention_mask"], vision_token_ids(model.config),
        model.grounding_config,
    )  # fmt: skip
    probe.remove()
    return out.loss + loss_attn + 0 * rows.sum()


def run_length(
    length: int,
    methods: list[str],
    repeats: int,
    device: str,
    checkpointing: bool,
    dtype: str = "float32",
    family: str = "qwen2_5_vl",
) -> list[dict]:
    """Time the methods interleaved (A B C A B C ...) so that machine drift hits all of them alike, then
    measure each one's peak tensor memory during one step."""
    import torch

    model = build_model(device, dtype, family)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    batch = build_batch(model, length, device)
    grounding = batch.pop("grounding")

    def step(method: str) -> None:
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

    times: dict[str, list[float]] = {m: [] for m in methods}
    for method in methods:
        step(method)  # warm-up
    for _ in range(repeats):
        for method in methods:
            start = time.perf_counter()
            step(method)
            times[method].append(time.perf_counter() - start)
    rows = []
    for method in methods:
        model.zero_grad(set_to_none=True)
        rows.append({
            "method": method,
            "length": int(batch["input_ids"].shape[1]),
            "video_tokens": int((batch["input_ids"] == model.config.video_token_id).sum()),
            "step_s": statistics.median(times[method]),
            "peak_mb": peak_memory(lambda m=method: step(m), device) / 2**20,
        })  # fmt: skip
    return rows


def peak_memory(fn, device: str) -> int:
    """Peak bytes of live tensors while `fn` runs (weights included), independent of the allocator's caching.

    CUDA: `max_memory_allocated`; CPU: the profiler's memory timeline (PyTorch's CPU allocator keeps no peak).
    """
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.raw.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    return max(sum(s) for s in sizes)


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
    from swim.tiny import FAMILY_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--family", default="qwen2_5_vl", choices=FAMILY_NAMES, help="tiny model of this family"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    for length in args.lengths:
        rows += run_length(
            length, args.methods, args.repeats, args.device, args.checkpointing, args.dtype, args.family
        )
        for r in rows[-len(args.methods) :]:
            logger.info("%s @ %d: %.3f s, %.0f MB", r["method"], r["length"], r["step_s"], r["peak_mb"])
    table = format_table(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "checkpointing": args.checkpointing, "device": args.device, "dtype": args.dtype},
                      f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
