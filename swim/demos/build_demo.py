"""``make demo-build``: NL-Refer construction end to end, offline: synth -> build -> validate -> a short training run.

1. ``swim data synth --format videorefer`` writes raw VideoRefer-format files (``<objectN><region>``
   placeholders, RLE masks) for the synthetic shapes videos, and ``scenes.json`` (each record's objects);
2. a local OpenAI-compatible server on 127.0.0.1 (`swim.data.nl_refer.local_llm`), started and stopped by this
   command, stands in for the LLM: a deterministic responder reads the scene description and answers in the
   reply schema. A few records get a faulty first reply (a leaked placeholder, a tagged adjective, invalid JSON,
   ...) or a faulty reply twice, so that the retry and the rejection paths show in the report;
3. ``swim data build`` rewrites the detailed-caption, QA, Bench-D and Bench-Q files through that server;
4. ``swim validate`` checks the outputs; ``swim train`` trains a tiny random Qwen2.5-VL on the rewritten
   detailed captions and QA for a few steps, and ``swim eval bench-q`` runs it on the rewritten Bench-Q (the
   files are read without conversion; the tiny model's accuracy means nothing);
5. ``OUT/stats.json`` (the build's statistics per kind) and ``OUT/examples.md`` (before/after pairs and the
   rejections with their reasons).

The token-level tag check uses the real Qwen2.5-VL tokenizer (``make real-tokenizer``, part of ``make setup``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

KINDS = {  # kind -> raw file written by `swim data synth --format videorefer`
    "detailed": "videorefer-detailed-caption.json",
    "qa": "videorefer-qa.json",
    "bench_d": "VideoRefer-Bench-D.json",
    "bench_q": "VideoRefer-Bench-Q.json",
}
# Faulty replies for a few records (by position in their file): [first reply, retry]; see local_llm.FaultResponder.
DEMO_FAULTS = {
    "detailed": {1: ["leak_region"], 3: ["tag_adjective", "tag_adjective"], 5: ["invalid_json"]},
    "qa": {1: ["swapped_order"], 2: ["changed_facts", "changed_facts"], 4: ["http_500"]},
    "bench_q": {1: ["mask_language"]},
    "bench_d": {},
}
REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = REPO / ".cache" / "qwen25vl-tokenizer"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m swim.demos.build_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo-build"))
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--num", type=int, default=12, help="records per raw file")
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synthesize(out: Path, num: int, seed: int) -> Path:
    from swim.data.synth.cli import main as synth_main

    data = out / "raw"
    synth_main([str(data), "--format", "videorefer", "--seed", str(seed), "--num-train", str(num), "--num-val", str(num),
                "--num-bench-q", str(num), "--num-bench-d", str(num)])  # fmt: skip
    return data


def faults_by_id(data: Path) -> dict[str, list[str]]:
    faults: dict[str, list[str]] = {}
    for kind, by_position in DEMO_FAULTS.items():
        records = json.loads((data / KINDS[kind]).read_text())
        for position, sequence in by_position.items():
            if position < len(records):
                faults[str(records[position]["id"])] = sequence
    return faults


def build_all(data: Path, nl_refer: Path, base_url: str, tokenizer: Path) -> dict[str, dict]:
    from swim.data.nl_refer.build import main as build_main

    stats = {}
    for kind, name in KINDS.items():
        out = nl_refer / kind
        try:
            build_main([str(data / name), "--out", str(out), "--kind", kind, "--llm", base_url, "--model", "local",
                        "--tokenizer", str(tokenizer), "--concurrency", "4", "--backoff-s", "0.05"])  # fmt: skip
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"swim data build --kind {kind} exited with {e.code}") from e
        stats[kind] = json.loads((out / "stats.json").read_text())
    return stats


def validate_outputs(stats: dict[str, dict]) -> None:
    from swim.data.validate import main as validate_main

    for path in (path for s in stats.values() for path in s["outputs"]):
        try:
            validate_main([path])
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"swim validate found problems in {path}") from e


def train(out: Path, stats: dict[str, dict], steps: int) -> Path:
    from swim.tiny import build_tiny_checkpoint
    from swim.train import main as train_main

    tiny = build_tiny_checkpoint(out / "tiny", family="qwen2_5_vl")
    train_files = [path for kind in ("detailed", "qa") for path in stats[kind]["outputs"]]
    data_config = out / "data.yaml"
    data_config.write_text(
        json.dumps(
            {
                "datasets": [
                    {"json_path": str(Path(p).resolve()), "sampling_strategy": "all"} for p in train_files
                ]
            }
        )
    )
    run_dir = out / "train"
    train_main(["--config", str(REPO / "recipes" / "demo_cpu.yaml"), "--model_name_or_path", str(tiny),
                "--data_config", str(data_config), "--max_steps", str(steps), "--per_device_train_batch_size", "4",
                "--output_dir", str(run_dir), "--save_strategy", "no", "--logging_steps", "1",
                "--cache_samples", "false"])  # fmt: skip
    return run_dir


def evaluate(out: Path, stats: dict[str, dict], run_dir: Path) -> dict:
    """`swim eval bench-q` on the rewritten Bench-Q, with the briefly trained tiny model (a reading check)."""
    from swim.eval.bench_q import main as bench_q_main

    bench = next(iter(stats["bench_q"]["outputs"]))
    bench_q_main(["--model", str(run_dir), "--bench", bench, "--out", str(out / "eval_bench_q"), "--max-new-tokens", "4",
                  "--num-frames", "4", "--max-pixels", "12544", "--overwrite"])  # fmt: skip
    return json.loads((out / "eval_bench_q" / "results.json").read_text())


def examples_page(stats: dict[str, dict], per_kind: int = 2) -> str:
    """Markdown: for each kind, a few before/after pairs, the records accepted after a retry, every rejection."""
    lines = [
        "# NL-Refer build demo: before and after",
        "",
        "Written by `make demo-build` (swim.demos.build_demo).",
        "",
    ]
    for kind, s in stats.items():
        source = {str(r["id"]): r for r in json.loads(Path(s["inputs"][0]).read_text())}
        output_path = Path(next(iter(s["outputs"])))
        outputs = json.loads(output_path.read_text())
        rejected = [
            json.loads(line)
            for line in (output_path.parent / "rejected.jsonl").read_text().splitlines()
            if line
        ]
        lines += [f"## {kind}: {s['accepted']} accepted ({s['accepted_after_retry']} after a retry), "
                  f"{sum(s['rejected'].values())} rejected", ""]  # fmt: skip
        shown = {id(r): r for r in outputs[:per_kind] + [r for r in outputs if r["meta"]["attempts"] > 1]}
        for record in shown.values():
            note = " (accepted after a retry)" if record["meta"]["attempts"] > 1 else ""
            lines += [f"`{record['id']}`{note}", "```", "before: " + _text(source[str(record["id"])]),
                      "after:  " + _text(record), "```", ""]  # fmt: skip
        for r in rejected:
            lines += [
                f"`{r['id']}` rejected at stage `{r['stage']}`: "
                + "; ".join(r.get("problems") or r["codes"]),
                "",
            ]
    return "\n".join(lines)


def _text(record: dict) -> str:
    if "Question" in record:
        text = record["Question"]
    elif "conversations" in record:
        text = " / ".join(t["value"] for t in record["conversations"])
    else:
        text = record["caption"]
    return text.replace("<video>\n", "").replace("\n", " ")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not (args.tokenizer / "tokenizer_config.json").is_file():
        sys.exit(f"no Qwen2.5-VL tokenizer at {args.tokenizer}: run `make real-tokenizer` first")
    from swim.data.nl_refer.local_llm import FaultResponder, LocalLLMServer, SceneResponder

    args.out.mkdir(parents=True, exist_ok=True)
    data = synthesize(args.out, args.num, args.seed)
    responder = FaultResponder(SceneResponder.from_file(data / "scenes.json"), faults_by_id(data))
    with LocalLLMServer(responder) as server:
        logger.info("local rewriting server at %s", server.base_url)
        stats = build_all(data, args.out / "nl_refer", server.base_url, args.tokenizer)
    validate_outputs(stats)
    run_dir = train(args.out, stats, args.train_steps)
    metrics = evaluate(args.out, stats, run_dir)
    logger.info(
        "swim eval bench-q read the rewritten Bench-Q: %s",
        {k: v for k, v in metrics.items() if not isinstance(v, dict)},
    )
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    (args.out / "examples.md").write_text(examples_page(stats))
    total = {k: (s["accepted"], sum(s["rejected"].values())) for k, s in stats.items()}
    logger.info("demo-build done: accepted/rejected per kind %s; trained %s; see %s and %s", total, run_dir,
                args.out / "stats.json", args.out / "examples.md")  # fmt: skip


if __name__ == "__main__":
    main()
