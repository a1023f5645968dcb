"""``swim data synth``: the synthetic data sets, one command.

swim data synth OUT_DIR [--seed 0 --num-train 200 ...]          # shapes videos, NL-Refer-style records (shapes)
swim data synth OUT_DIR --format videorefer ...                 # the same scenes, raw VideoRefer files (videorefer)
swim data synth OUT_DIR --task grid_patch|line_intersection|... # KLAL's image tasks (klal)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

from swim.data.synth.shapes import SynthConfig, generate
from swim.data.synth.shapes import __doc__ as SHAPES_DOC

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swim data synth",
        description=SHAPES_DOC.split("\n\n")[0],
        epilog="KLAL's image tasks instead: swim data synth OUT_DIR --task grid_patch|line_intersection|line_tracing|"
        "points|rec (options: swim data synth OUT_DIR --task grid_patch --help).",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--num-bench-q", type=int, default=50, help="Bench-Q questions (types in rotation)")
    parser.add_argument("--num-bench-d", type=int, default=20)
    parser.add_argument(
        "--format",
        choices=("nl_refer", "videorefer"),
        default="nl_refer",
        help="nl_refer: the files described above; videorefer: raw VideoRefer-700K/-Bench files with <region> "
        "placeholders (--num-train detailed captions, --num-val QA; swim.data.synth.videorefer)",
    )
    for f in fields(SynthConfig):  # every knob of SynthConfig is a flag: --object-size 30, --colours red blue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, nargs="+", default=list(f.default))
        elif f.default is None:  # the optional integers (height)
            parser.add_argument(flag, type=int, default=None)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--task" or a.startswith("--task=") for a in argv):  # KLAL's image tasks
        from swim.data.synth.klal import main as klal_main

        klal_main(argv)
        return
    args = _parser().parse_args(argv)
    cfg = SynthConfig(
        **{
            f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
            for f in fields(SynthConfig)
        }
    )
    counts = {
        "train": args.num_train,
        "val": args.num_val,
        "bench_q": args.num_bench_q,
        "bench_d": args.num_bench_d,
    }
    start = time.perf_counter()
    if args.format == "videorefer":
        from swim.data.synth.videorefer import generate_videorefer

        counts = {
            "detailed": counts["train"],
            "qa": counts["val"],
            "bench_d": counts["bench_d"],
            "bench_q": counts["bench_q"],
        }
        paths = generate_videorefer(args.out_dir, cfg, args.seed, counts)
        paths.pop("scenes")
    else:
        paths = generate(args.out_dir, cfg, args.seed, counts)
    logger.info(
        "wrote %s to %s in %.1f s",
        ", ".join(f"{counts[s]} {s}" for s in paths),
        args.out_dir,
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
