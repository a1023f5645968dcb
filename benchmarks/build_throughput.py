"""``swim data build`` throughput and memory, against the local stand-in server (not a timed test).

    python benchmarks/build_throughput.py --tokenizer .cache/qwen25vl-tokenizer [--latency 0.3]
        [--concurrency 1 8 32 64] [--rss-gb 2] [--out runs/bench-build]

1. Records/s at each concurrency, with the server (its own process, so that it does not share this process's
   GIL with the client) answering every request after ``--latency`` seconds: the speed-up over concurrency 1 is
   the figure to look at (the ideal is the concurrency itself).
2. Peak RSS of ``swim data build --dry-run`` (read, check every mask, plan, count tokens) while streaming a
   generated raw file of ``--rss-gb`` GB (720p masks on 32 frames per record, ~9 KB of RLE per mask).
3. The request-token estimate for the real sizes (125K detailed captions + 75K QA), from ``--dry-run`` token
   counts on records of realistic length (the assumptions are printed with the figures).

Every figure goes to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from swim.data.masks import encode_mask

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "The man walks slowly along the river while holding a red umbrella and looking at the boats. "


def qa_records(n: int, seed: int = 0) -> tuple[list[dict], dict[str, list[dict]]]:
    """Single-object QA records with one small mask each, and the scenes the stand-in responder reads."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 1
    rle = encode_mask(mask)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    records, scenes = [], {}
    for i in range(n):
        rid = f"bench_qa_{i:06d}"
        records.append({"id": rid, "video": "videos/none.mp4", "height": 8, "width": 8,
                        "conversations": [{"from": "human", "value": "<video>\nIn which direction does <region> move?"},
                                          {"from": "gpt", "value": "It moves to the left."}],
                        "annotation": [{"0": {"segmentation": rle}}]})  # fmt: skip
        scenes[rid] = [{"colour": str(rng.choice(colours)), "shape": str(rng.choice(shapes))}]
    return records, scenes


def start_server(scenes_path: Path, latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "swim.data.nl_refer.local_llm", "--scenes", str(scenes_path),
                             "--latency", str(latency)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    line = proc.stdout.readline().strip()
    if not line.startswith("LOCAL_LLM_URL="):
        proc.kill()
        raise RuntimeError(f"the stand-in server did not start: {line!r}")
    return proc, line.split("=", 1)[1]


def build_cmd(inputs: list[Path], out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "swim.cli", "data", "build", *map(str, inputs), "--out", str(out), "--kind", "qa",
            "--model", "local", "--tokenizer", str(tokenizer), "--skip-video-check", *extra]  # fmt: skip


def throughput(args, out: Path) -> list[dict]:
    results = []
    biggest = max(args.concurrency)
    records, scenes = qa_records(max(20, int(biggest / args.latency * args.seconds)))
    (out / "scenes.json").write_text(json.dumps(scenes))
    server, url = start_server(out / "scenes.json", args.latency)
    try:
        for c in args.concurrency:
            n = max(20, int(c / args.latency * args.seconds))
            data = out / f"qa_{c}.json"
            data.write_text(json.dumps(records[:n]))
            run = out / f"run_c{c}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            subprocess.run(build_cmd([data], run, args.tokenizer, "--llm", url, "--concurrency", str(c), "--no-fsync"),
                           check=True, stderr=subprocess.DEVNULL)  # fmt: skip
            stats = json.loads((run / "stats.json").read_text())
            # elapsed_s: from the first request to the outputs written (the model load is before it)
            rate = stats["records"] / stats["elapsed_s"]
            results.append({"concurrency": c, "records": stats["records"], "accepted": stats["accepted"],
                            "elapsed_s": stats["elapsed_s"], "records_per_s": round(rate, 2)})  # fmt: skip
            print(
                f"concurrency {c:>3}: {stats['records']} records in {stats['elapsed_s']:.1f} s = {rate:.1f} rec/s"
            )
    finally:
        server.terminate()
        server.wait()
    base = results[0]["records_per_s"]
    for r in results:
        r["speedup_vs_first"] = round(r["records_per_s"] / base, 1)
    return results


def heavy_throughput(args, out: Path, n: int = 240, frames: int = 8) -> list[dict]:
    """Concurrency 32 on records with 720p masks (``frames`` per record, ~9 KB of RLE each): the input checks
    decode every mask, with 1 and 2 check processes."""
    light, scenes = qa_records(n)
    masks = _masks_720p()
    records = []
    for rec in light:
        rec = dict(rec, height=720, width=1280)
        rec["annotation"] = [
            {str(t): {"segmentation": json.loads(masks[t % len(masks)])} for t in range(frames)}
        ]
        records.append(rec)
    data = out / "heavy_qa.json"
    data.write_text(json.dumps(records))
    (out / "heavy_scenes.json").write_text(json.dumps(scenes))
    server, url = start_server(out / "heavy_scenes.json", args.latency)
    results = []
    try:
        for workers in (1, 2):
            run = out / f"run_heavy_w{workers}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            cmd = build_cmd([data], run, args.tokenizer, "--llm", url, "--concurrency", "32", "--no-fsync",
                            "--check-workers", str(workers))  # fmt: skip
            subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
            stats = json.loads((run / "stats.json").read_text())
            rate = stats["records"] / stats["elapsed_s"]
            results.append(
                {"check_workers": workers, "records": stats["records"], "records_per_s": round(rate, 2)}
            )
            print(
                f"720p masks x {frames} frames, concurrency 32, {workers} check process(es): {rate:.1f} rec/s"
            )
    finally:
        server.terminate()
        server.wait()
    return results


def _masks_720p() -> list[str]:
    h, w = 720, 1280
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for k in range(8):
        inside = ((xx - 500 - 20 * k) ** 2 / 300**2 + (yy - 360) ** 2 / 200**2) < 1
        masks.append(
            json.dumps(
                encode_mask((inside ^ (((xx // 37 + yy // 41 + k) % 3 == 0) & inside)).astype(np.uint8))
            )
        )
    return masks


def big_file(path: Path, gigabytes: float, frames: int = 32) -> int:
    """A raw detailed-caption file of about ``gigabytes`` GB: 720p masks (~9 KB RLE) on ``frames`` frames."""
    h, w = 720, 1280
    masks = _masks_720p()
    caption = SENTENCE * 10
    n = 0
    with path.open("w") as f:
        f.write("[\n")
        while f.tell() < gigabytes * 1e9:
            annotation = (
                "{"
                + ", ".join(f'"{t}": {{"segmentation": {masks[(n + t) % 8]}}}' for t in range(frames))
                + "}"
            )
            human = json.dumps({"from": "human", "value": "<video>\nPlease describe <region> in detail."})
            gpt = json.dumps({"from": "gpt", "value": caption})
            f.write(("," if n else "") + f'{{"id": {n}, "video": "v.mp4", "height": {h}, "width": {w}, '
                    f'"conversations": [{human}, {gpt}], "annotation": [{annotation}]}}\n')  # fmt: skip
            n += 1
        f.write("]\n")
    return n


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a command, polled every 0.1 s."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return peak / 2**20, time.perf_counter() - start


def memory(args, out: Path) -> dict:
    path = out / "big-detailed-caption.json"
    n = big_file(path, args.rss_gb)
    size = path.stat().st_size
    rss, seconds = peak_rss(build_cmd([path], out / "run_big", args.tokenizer, "--dry-run"))
    print(f"{size / 1e9:.2f} GB, {n} records: peak RSS {rss:.0f} MB, {seconds:.0f} s (--dry-run)")
    path.unlink()
    return {
        "file_gb": round(size / 1e9, 2),
        "records": n,
        "peak_rss_mb": round(rss),
        "seconds": round(seconds),
    }


def cost_estimate(args, out: Path) -> dict:
    """Dry-run token counts on records of realistic length, scaled to 125K detailed + 75K QA records."""
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 1
    ann = {"0": {"segmentation": encode_mask(mask)}}
    caption = (SENTENCE * 8).strip()  # ~140 words: the length of a VideoRefer detailed caption (assumed)
    detailed = [{"id": i, "video": "v.mp4", "height": 8, "width": 8, "annotation": [ann],
                 "conversations": [{"from": "human", "value": "<video>\nPlease describe <region> in detail."},
                                   {"from": "gpt", "value": caption}]} for i in range(50)]  # fmt: skip
    qa = [{"id": i, "video": "v.mp4", "height": 8, "width": 8, "annotation": [ann, ann],
           "conversations": [{"from": "human", "value": "<video>\nThere are 2 objects in the video: <object0><region>, "
                              "<object1><region>.\nWhat is <object0> doing while <object1> walks towards the door?"},
                             {"from": "gpt", "value": "<object0> is sitting on the bench and reading a newspaper, "
                              "without looking at <object1>."}]} for i in range(50)]  # fmt: skip
    figures = {}
    for kind, records, real in (("detailed", detailed, 125_000), ("qa", qa, 75_000)):
        path = out / f"estimate_{kind}.json"
        path.write_text(json.dumps(records))
        done = subprocess.run(build_cmd([path], out / f"estimate_{kind}", args.tokenizer, "--dry-run", "--model",
                                        "gpt-4o-2024-11-20"), capture_output=True, text=True, check=True)  # fmt: skip
        estimate = json.loads(done.stdout[done.stdout.index("{") :])
        per_in = estimate["estimated_prompt_tokens"] / estimate["requests"]
        per_out = estimate["estimated_completion_tokens"] / estimate["requests"]
        figures[kind] = {"records": real, "prompt_tokens_per_record": round(per_in),
                         "completion_tokens_per_record": round(per_out)}  # fmt: skip
    prices = {
        "input": 2.50,
        "output": 10.00,
    }  # gpt-4o list price per 1M tokens (swim/data/nl_refer/prices.yaml)
    total_in = sum(f["records"] * f["prompt_tokens_per_record"] for f in figures.values())
    total_out = sum(f["records"] * f["completion_tokens_per_record"] for f in figures.values())
    usd = (total_in * prices["input"] + total_out * prices["output"]) / 1e6
    figures["total"] = {"prompt_tokens": total_in, "completion_tokens": total_out, "usd_online": round(usd),
                        "usd_batch": round(usd / 2), "prices_per_1m": prices,
                        "assumes": "first attempts only (a retry adds one request per rejected reply); detailed captions of ~140 words; two-object QA"}  # fmt: skip
    print(json.dumps(figures, indent=1))
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, default=REPO / ".cache" / "qwen25vl-tokenizer")
    p.add_argument("--latency", type=float, default=0.3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=6.0, help="target send time per concurrency")
    p.add_argument("--rss-gb", type=float, default=2.0, help="0 skips the memory run")
    p.add_argument("--out", type=Path, default=Path("runs/bench-build"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"latency_s": args.latency, "cpus": os.cpu_count()}
    results["cost_estimate"] = cost_estimate(args, args.out)
    results["throughput"] = throughput(args, args.out)
    results["throughput_720p_masks"] = heavy_throughput(args, args.out)
    if args.rss_gb > 0:
        results["memory"] = memory(args, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
