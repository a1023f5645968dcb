"""A pretrained base for the demos, built once and cached by content: ``swim pretrain --config CONFIG``.

A randomly initialised vision tower cannot learn to tell a circle from a square within a demo's few hundred
steps: a demo trained from scratch shows "the tagged word finds the named colour" and little more
(docs/demo_design.md §5-§7). Real SWIM starts from a pretrained Qwen2.5-VL whose vision tower already sees
objects, and freezes it. This module gives the tiny model the same starting point: next-token training only,
on synthetic videos drawn with their own seed, that name every object ("A dark red ring moving up and a bright
blue square moving to the left.", `swim.data.synth.shapes.inventory_record`). No question refers to one object,
no mask is used and no attention is supervised, so the base learns to see colours, shades and shapes but was
never taught to point; its zero-shot figures are reported beside each demo that uses it.

The base is one fixed checkpoint for every seed and arm of a demo, like a public checkpoint. It is cached under
``CACHE/base-<hash>``, the hash covering the pretraining config, the training recipe's settings, the synthetic
generator's source and `BASE_FORMAT`: changing any of them rebuilds it, re-running reuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

BASE_FORMAT = 1  # bump when the generator or the build changes what a cached base contains
DONE_FILE = "base.json"
REPLACED = ("model_name_or_path", "data_config", "output_dir")  # recipe settings the build sets itself


@dataclass
class PretrainConfig:
    recipe: str = "demo_base_cpu.yaml"  # training recipe, relative to the config's folder
    seed: int = 1000  # data, initialisation and training; fixed, so every demo seed shares the base
    num_videos: int = 6000
    model: dict = field(default_factory=dict)  # swim.tiny.tiny_config_dict overrides
    synth: dict = field(default_factory=dict)  # swim.data.synth.shapes.SynthConfig fields
    max_steps: int | None = None  # override of the recipe's (tests)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PretrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown pretraining settings {sorted(unknown)}")
        cfg = cls(**data)
        cfg.recipe = str(Path(path).parent / cfg.recipe)
        if not Path(cfg.recipe).exists():
            raise ValueError(f"{path}: recipe {cfg.recipe} not found")
        return cfg

    def content_hash(self) -> str:
        """12 hex digits over every setting, the recipe's settings, the synthetic generator's source and
        `BASE_FORMAT`; not over the recipe's path, its comments, or the paths the build replaces (`REPLACED`)."""
        from swim.data.synth import shapes

        recipe = yaml.safe_load(Path(self.recipe).read_text()) or {}
        recipe = {k: v for k, v in recipe.items() if k not in REPLACED}
        generator = hashlib.sha256(Path(shapes.__file__).read_bytes()).hexdigest()
        settings = {**asdict(self), "recipe": recipe, "generator": generator, "format": BASE_FORMAT}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def cached_base(cfg: PretrainConfig, cache_dir: str | Path) -> Path | None:
    """The finished base of `cfg` under `cache_dir`, or None."""
    path = Path(cache_dir) / f"base-{cfg.content_hash()}"
    return path if (path / DONE_FILE).exists() else None


def build_base(cfg: PretrainConfig, cache_dir: str | Path) -> Path:
    """The pretrained base of `cfg`: reused from `cache_dir` when built before, else built there (data ->
    tiny model -> next-token training) and published by an atomic rename. Returns the checkpoint folder."""
    from swim.data.synth.shapes import SynthConfig, generate
    from swim.demos.common import publish
    from swim.tiny import build_tiny_checkpoint

    found = cached_base(cfg, cache_dir)
    if found is not None:
        logger.info("pretrained base: reusing %s", found)
        return found
    final = Path(cache_dir) / f"base-{cfg.content_hash()}"
    work = Path(cache_dir) / f".build-{cfg.content_hash()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    start = time.time()
    logger.info("pretrained base: building %s (cached for later runs)", final)

    paths = generate(work / "data", SynthConfig(**cfg.synth), cfg.seed, {"pretrain": cfg.num_videos})
    model_dir = build_tiny_checkpoint(work / "init", seed=cfg.seed, **cfg.model)
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "swim.train", "--config", cfg.recipe, "--model_name_or_path", str(model_dir),
           "--data_config", str(paths["pretrain"]), "--output_dir", str(run_dir), "--seed", str(cfg.seed),
           "--data_seed", str(cfg.seed), "--attn_weight", "0"]  # fmt: skip
    if cfg.max_steps is not None:
        cmd += ["--max_steps", str(cfg.max_steps)]
    with open(work / "train.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        tail = (work / "train.log").read_text()[-3000:]
        raise RuntimeError(f"pretraining failed (exit {code}); log {work / 'train.log'}, its end:\n{tail}")

    state = json.loads((run_dir / "trainer_state.json").read_text())
    logs = [e for e in state["log_history"] if "loss" in e and "mean_token_accuracy" in e]
    for stale in run_dir.glob("checkpoint-*"):  # the optimizer state is not part of a base
        shutil.rmtree(stale)
    shutil.move(str(work / "train.log"), run_dir / "pretrain.log")
    summary = {
        "hash": cfg.content_hash(),
        "config": asdict(cfg),
        "steps": state["global_step"],
        "final_train_token_accuracy": float(logs[-1]["mean_token_accuracy"]) if logs else None,
        "final_train_loss": float(logs[-1]["loss"]) if logs else None,
        "seconds": time.time() - start,
    }
    (run_dir / DONE_FILE).write_text(json.dumps(summary, indent=2))
    publish(run_dir, final, DONE_FILE)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("pretrained base: %s (%.0f s, final token accuracy %s)", final, summary["seconds"],
                summary["final_train_token_accuracy"])  # fmt: skip
    return final


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="swim pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="recipes/demo_base.yaml")
    parser.add_argument("--cache-dir", default="runs/cache", help="where bases are kept, one folder per hash")
    parser.add_argument("--max-steps", type=int, help="override the recipe (quick runs; changes the hash)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = PretrainConfig.from_yaml(args.config)
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    path = build_base(cfg, args.cache_dir)
    print(path)
    return path


if __name__ == "__main__":
    main()
