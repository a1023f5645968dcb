"""``swim demo --config RECIPE``: the SWIM demo (`swim.demos.swim_demo`), or the KLAL demo
(`swim.demos.klal_demo`) for a config with ``kind: klal``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="swim demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="recipes/demo.yaml")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--max-steps", type=int, help="override the recipe (quick runs)")
    parser.add_argument("--num-train", type=int)
    parser.add_argument("--num-val", type=int)
    parser.add_argument("--num-shifted-val", type=int)
    parser.add_argument(
        "--cache-dir", help="where the pretrained base is kept (default: the config's, runs/cache)"
    )
    parser.add_argument(
        "--base-num-videos", type=int, help="override the pretrained base's size (quick runs)"
    )
    parser.add_argument(
        "--base-max-steps", type=int, help="override the pretrained base's steps (quick runs)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="run the demo once per seed (out/seed_N) + a summary"
    )
    parser.add_argument("--quick", action="store_true", help="KLAL demo: the config's `quick` sizes (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (yaml.safe_load(Path(args.config).read_text()) or {}).get("kind") == "klal":
        from swim.demos.klal_demo import run_from_args
    else:
        from swim.demos.swim_demo import run_from_args
    return run_from_args(args)
