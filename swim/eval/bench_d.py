"""VideoRefer-Bench-D: detailed descriptions of a referred object, scored by an LLM judge.

    export OPENAI_API_KEY=...            # and OPENAI_BASE_URL for a non-OpenAI endpoint
    swim eval bench-d --model CKPT --bench refined-VideoRefer-Bench-D.json --data-root Panda-70M-part \
        --out OUT
    # generation over 4 GPUs, then judge + aggregate in one process:
    for i in 0 1 2 3; do
        CUDA_VISIBLE_DEVICES=$i swim eval bench-d ... --num-shards 4 --shard-index $i --generate-only &
    done; wait
    swim eval bench-d --merge --bench refined-VideoRefer-Bench-D.json --out OUT

Stages, each resumable (kill and rerun the same command; nothing done is redone or paid for twice):
1. generate: the question is the refined record's first human turn with ``<ins>`` tags removed (original
   records have no question: ``--default-question`` is used, tags removed too); answers go to
   ``OUT/generations*.jsonl`` as they are produced.
2. judge (`swim.eval.judge`): each answer is compared with the reference description (tags removed) on four
   dimensions, integers 0-5; replies are cached in ``OUT/judge_cache.jsonl`` as they arrive.
3. aggregate: per dimension, the mean over the items that were scored; the score is the mean of the four
   dimension means (VideoRefer's convention). Items that could not be scored (generation failed, judge
   request failed, unparsable reply) are NOT dropped silently: ``n_scored``/``n_failed`` and the list
   ``failed`` are reported, and ``score_failures_as_zero`` gives the score with every failure counted as 0.

Outputs: ``scored.jsonl`` (one line per item, bench order, with the judge's raw reply) and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swim.data.records import BENCH_D_PROMPT
from swim.eval.bench_q import add_bench_io_args, check_same_bench, clean_text, load_bench
from swim.eval.bench_q import run_config as bench_q_run_config
from swim.eval.generate import (
    Generator,
    GenItem,
    add_generation_args,
    add_model_args,
    add_video_args,
    generation_settings_from_args,
    load_model,
    read_generations,
    run_generation_stage,
    video_settings_from_args,
)
from swim.eval.judge import DIMENSIONS, Judge, JudgeFatalError, add_judge_args, judge_config_from_args
from swim.eval.sharding import Shard

logger = logging.getLogger(__name__)

PROMPT_VERSION = 1


@dataclass
class DItem:
    key: str  # str(position in the bench file)
    index: int
    id: Any
    video: str  # resolved path
    question: str
    reference: str


def build_items(records: Sequence[Any], default_question: str = BENCH_D_PROMPT) -> list[DItem]:
    return [
        DItem(
            key=str(r.position),
            index=r.position,
            id=r.id,
            video=str(r.media[1]),
            question=clean_text(r.question or default_question),
            reference=clean_text(r.caption),
        )
        for r in records
    ]


def judge_items(
    items: Sequence[DItem], generations: dict[str, dict[str, Any]], judge: Judge, *, workers: int = 4
) -> list[dict[str, Any]]:
    """One scored record per item, in bench order. Items without a usable answer are not sent to the judge.

    Raises `JudgeFatalError` (after letting in-flight requests finish and be cached) if the judge is unusable.
    """
    from tqdm.auto import tqdm

    rows: dict[str, dict[str, Any]] = {}
    to_judge = []
    for it in items:
        gen = generations.get(it.key)
        row = {
            "key": it.key,
            "index": it.index,
            "id": it.id,
            "video": it.video,
            "question": it.question,
            "reference": it.reference,
            "prediction": None if gen is None else gen.get("text"),
            "scores": None,
            "status": "scored",
            "reason": None,
            "judge_reply": None,
            "judge_cache_key": None,
        }
        rows[it.key] = row
        if gen is None:
            row.update(status="failed", reason="generation: missing")
        elif gen.get("error"):
            row.update(status="failed", reason=gen["error"])
        else:
            to_judge.append(it)

    def one(it: DItem):
        return it.key, judge.score(it.reference, rows[it.key]["prediction"] or "")

    bar = tqdm(total=len(to_judge), desc="judge", unit="item", dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="swim-judge")
    try:
        futures = [pool.submit(one, it) for it in to_judge]
        for fut in as_completed(futures):
            key, res = fut.result()
            row = rows[key]
            row.update(judge_reply=res.reply, judge_cache_key=res.cache_key, scores=res.scores)
            if not res.ok:
                row.update(status="failed", reason=res.error)
                logger.warning("item %s not scored: %s", key, res.error)
            bar.update(1)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # in-flight replies still land in the cache
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    return [rows[it.key] for it in items]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Dimension means over the scored items, their mean, and the failures (listed, also scored as 0)."""
    scored = [r for r in rows if r["scores"] is not None]
    failed = [r for r in rows if r["scores"] is None]
    dims = {d: _mean([r["scores"][d] for r in scored]) for d in DIMENSIONS}
    as_zero = {d: _mean([r["scores"][d] if r["scores"] else 0.0 for r in rows]) for d in DIMENSIONS}
    kinds = {"generation": 0, "judge_request": 0, "judge_parse": 0}
    for r in failed:
        reason = r["reason"] or ""
        if reason.startswith("request failed"):
            kinds["judge_request"] += 1
        elif reason.startswith("unparsable reply"):
            kinds["judge_parse"] += 1
        else:
            kinds["generation"] += 1
    return {
        "n_items": len(rows),
        "n_scored": len(scored),
        "n_failed": len(failed),
        "failed_by_stage": kinds,
        "dimensions": dims,
        "score": None if not scored else _mean(list(dims.values())),
        "score_failures_as_zero": None if not rows else _mean(list(as_zero.values())),
        "failed": [{k: r[k] for k in ("key", "id", "video", "reason")} for r in failed],
    }


def write_outputs(out_dir: Path, rows: Sequence[dict], results: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "scored.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def log_results(results: dict[str, Any], out_dir: Path) -> None:
    score = results["score"]
    logger.info(
        "Bench-D score %s over %d scored item(s); %d of %d failed (%s) and are listed in results.json; "
        "with failures as 0: %s",
        "n/a" if score is None else f"{score:.3f}", results["n_scored"], results["n_failed"],
        results["n_items"], results["failed_by_stage"],
        "n/a" if results["score_failures_as_zero"] is None else f"{results['score_failures_as_zero']:.3f}",
    )  # fmt: skip
    for d, v in results["dimensions"].items():
        logger.info("  %-24s %s", d, "n/a" if v is None else f"{v:.3f}")
    logger.info("wrote %s and %s", out_dir / "results.json", out_dir / "scored.jsonl")


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swim eval bench-d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_io_args(parser, "Bench-D")
    parser.add_argument(
        "--default-question",
        default=BENCH_D_PROMPT,
        help="question for original-format records, which have none (tags are removed)",
    )
    parser.add_argument("--num-shards", type=int, default=1, help="split generation over N processes")
    parser.add_argument("--shard-index", type=int, default=0, help="which shard this process generates")
    parser.add_argument("--merge", action="store_true", help="judge + aggregate the shards' generations")
    parser.add_argument("--generate-only", action="store_true", help="stop after generation (no judge)")
    parser.add_argument("--overwrite", action="store_true", help="discard this shard's earlier generations")
    parser.add_argument("--allow-incomplete", action="store_true", help="judge even if answers are missing "
                        "(they count as failed)")  # fmt: skip
    add_model_args(parser, required=False)
    add_generation_args(parser, max_new_tokens=1024, batch_size=4)
    add_video_args(parser)
    add_judge_args(parser)
    return parser


def run_config(args: argparse.Namespace, model_path: str) -> dict[str, Any]:
    return {**bench_q_run_config(args, model_path, PROMPT_VERSION), "default_question": args.default_question}


def run(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run (or merge) Bench-D; returns the results dict when this process wrote them."""
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    shard = Shard(args.shard_index, args.num_shards)
    if args.merge:
        generations, config = read_generations(out_dir)
        bench, limit, default_question = (
            args.bench or config["bench"],
            config["limit"],
            config["default_question"],
        )
        check_same_bench(bench, config)
    else:
        if not args.model or not args.bench:
            raise SystemExit("--model and --bench are required (except with --merge)")
        bench, limit, default_question = args.bench, args.limit, args.default_question
    if not Path(bench).is_file():
        raise SystemExit(f"--bench {bench}: no such file")
    data_root = args.data_root if args.data_root is not None else str(Path(bench).resolve().parent)
    records, invalid = load_bench(bench, "bench_d", data_root)
    items = build_items(records, default_question)[:limit]
    logger.info("%s: %d items (%d invalid records)", bench, len(items), len(invalid))

    if not args.merge:
        config = run_config(args, str(Path(args.model).expanduser().resolve()))
        video_settings, gen_settings = video_settings_from_args(args), generation_settings_from_args(args)

        def make_generator() -> Generator:
            loaded = load_model(
                args.model, dtype=args.dtype, attn_implementation=args.attn_implementation, device=args.device
            )
            return Generator(loaded, video_settings, gen_settings)

        gen_items = [GenItem(it.key, Path(it.video), it.question) for it in items]
        run_generation_stage(
            gen_items, out_dir=out_dir, shard=shard, config=config, make_generator=make_generator,
            overwrite=args.overwrite, desc=f"bench-d{shard.suffix}",
        )  # fmt: skip
        if shard.count > 1 or args.generate_only:
            logger.info("generation done; run with --merge to judge and aggregate")
            return None
        generations, config = read_generations(out_dir, num_shards=1)

    missing = [it.key for it in items if it.key not in generations]
    if missing and not args.allow_incomplete:
        raise SystemExit(
            f"{len(missing)} item(s) have no generated answer (first: {missing[:5]}); rerun the missing "
            "shard(s) (they resume) or pass --allow-incomplete to count them as failed"
        )
    judge_config = judge_config_from_args(args)
    judge = Judge(judge_config, args.judge_cache or out_dir / "judge_cache.jsonl")
    try:
        rows = judge_items(items, generations, judge, workers=args.judge_workers)
    except JudgeFatalError as e:
        raise SystemExit(f"judge unusable: {e}") from e
    finally:
        judge.close()
    results = {
        "benchmark": "VideoRefer-Bench-D",
        **aggregate(rows),
        "n_invalid_records": len(invalid),
        "invalid_records": invalid,
        "judge": judge_config.public(),
        "judge_calls": {"made_now": judge.calls_made, "requests_sent_now": judge.requests_sent},
        "config": config,
    }
    write_outputs(out_dir, rows, results)
    log_results(results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (returns None so that console scripts exit 0); see `run`."""
    run(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
