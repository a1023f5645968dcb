"""Pieces every demo shares: the recipe's data arguments, a trained run's grounding and text-loss evaluation,
training-curve plots, mean ± standard deviation over seeds."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import yaml


def recipe_data_args(recipe: str, overrides: dict | None = None):
    """(DataArguments, the whole recipe as a dict) of a training recipe, with `overrides` applied."""
    from swim.train import DataArguments

    data = {**yaml.safe_load(Path(recipe).read_text()), **(overrides or {})}
    names = {f.name for f in fields(DataArguments)}
    return DataArguments(**{k: v for k, v in data.items() if k in names}), data


@torch.no_grad()
def evaluate_run(run_dir: Path, val_json: Path, cfg_recipe: dict, data_args) -> tuple[dict, tuple]:
    """Grounding metrics and held-out text loss of one trained run; returns (metrics, (model, dataset)).
    The held-out samples are built exactly as the training ones (same video settings and system prompt)."""
    from transformers import AutoTokenizer

    from swim.data.collator import SwimCollator
    from swim.data.dataset import SwimDataset
    from swim.data.records import load_records
    from swim.eval.grounding import evaluate_grounding
    from swim.modeling.families import family_of
    from swim.modeling.model import stock_model_class

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = stock_model_class(run_dir).from_pretrained(run_dir).eval()
    family = family_of(model)
    records, _ = load_records(val_json)
    dataset = SwimDataset(records, data_args.video_settings(family), tokenizer, supervise_qa=True, strict=True,
                          system_prompt=data_args.system_prompt, pair_mode=data_args.pair_mode,
                          family=family)  # fmt: skip
    collate = SwimCollator(tokenizer.pad_token_id)
    samples = [dataset[i] for i in range(len(dataset))]
    batches = [collate(samples[i : i + 16]) for i in range(0, len(samples), 16)]

    text_loss = held_out_text_loss(model, batches)
    layers = cfg_recipe.get("attn_layers")
    summary = evaluate_grounding(model, batches, layers, query_offset=cfg_recipe.get("attn_query_offset", 0))
    fused = summary["fused"]
    return {
        "pointing_game": fused["pointing_game"],
        "pointing_game_at_k": fused["pointing_game_at_k"],
        "mask_mass": fused["mask_mass"],
        "auc": fused["auc"],
        "nss": fused["nss"],
        "text_loss": text_loss,
        "pairs": fused["pairs"],
        "per_layer": {k: v for k, v in summary.items() if k != "fused"},
        "chance_pointing_game": fused["chance_pointing_game"],
        "chance_mask_mass": fused["chance_mask_mass"],
    }, (model, dataset)


def held_out_text_loss(model, batches: list[dict]) -> float:
    """Mean next-token loss per supervised (label) token over collated batches (no gradient is needed)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "grounding"}
            n = int((inputs["labels"][:, 1:] != -100).sum())
            total += float(model(**inputs).loss) * n
            tokens += n
    return total / max(tokens, 1)


def loss_curves(run_dirs: dict[str, Path], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, run_dir in run_dirs.items():
        state = json.loads((run_dir / "trainer_state.json").read_text())
        logs = [e for e in state["log_history"] if "loss_text" in e]
        steps = [e["step"] for e in logs]
        axes[0].plot(steps, [e["loss_text"] for e in logs], label=name)
        axes[1].plot(steps, [e.get("loss_attn", float("nan")) for e in logs], label=name)
    axes[0].set_title("next-token loss (train)")
    axes[1].set_title("attention KL loss (train; measured, λ=0 for baseline)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_seeds(cfg, args, keys: tuple[str, ...], run_demo, seeds_report) -> dict:
    """A demo's command line: the flags in `keys` that were given override `cfg`; then one run into `args.out`,
    or, with `args.seeds`, one run per seed into `args.out/seed_N` and the seeds report."""
    from dataclasses import replace

    for key in keys:
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    out = Path(args.out)
    if not args.seeds:
        return run_demo(cfg, out)
    return seeds_report([run_demo(replace(cfg, seed=seed), out / f"seed_{seed}") for seed in args.seeds], out)


def publish(built: Path, final: Path, done_file: str) -> None:
    """Move a finished build to its cache folder by an atomic rename; if another process published the same
    content first (`final/done_file` exists), keep theirs and drop this one."""
    try:
        built.rename(final)
    except OSError:
        if not (final / done_file).exists():
            raise
        shutil.rmtree(built, ignore_errors=True)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else 0.0)
