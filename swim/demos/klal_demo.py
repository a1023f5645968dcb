"""The KLAL demo: does supervising the answer token's attention make a tiny model answer better?

    make demo-klal   # = swim demo --config recipes/klal_demo.yaml --out runs/demo-klal
    swim demo --config recipes/klal_demo.yaml --quick --out /tmp/k   # toy sizes, for tests

A seeded reproduction of the KL attention loss paper's claim on one of its synthetic tasks (`task` in the config:
`grid_size` in `recipes/klal_demo.yaml`, the Grid Patch scenes with a one-token answer that a tiny model can learn;
`grid_patch` itself stays at the uniform-guess level in every arm at this scale), at CPU scale. Per seed (the
seed sets the data, the tiny model's initialisation and training): generate the task's train and held-out
images, build a tiny random Qwen2.5-VL, and train it three times with the same recipe (`recipes/klal_cpu.yaml`),
data order and steps:

- `ntp`: next-token loss only (`attn_weight: 0`);
- `klal`: next-token + KL attention loss (the recipe: last answer token, three-level map, per-layer KL, λ = 1);
- `control`: the same loss on targets moved to a wrong cell (every annotation shifted by at least
  `control_min_shift` cells, seeded), to tell a gain from correct targets apart from a regularisation effect.

Each run is scored on the held-out images: answer accuracy from greedy generation (`swim.eval.answers`), and on
the supervised row (the last answer token through the row the recipe supervises) KLAL's attention ratio (its
Figure 4: mean attention on the target tokens / mean over all image tokens; uniform = 1), the pointing game, per
layer and fused (`swim.eval.grounding`), and the held-out text loss. Writes `report.md` / `report.json` with per
seed rows, mean ± standard deviation over seeds, the paired per-seed gaps, the demo's targets per seed
(`TARGETS`), each arm's most common answer, chance levels (uniform guess, the majority answer, the question-only
prior, colour-only and shape-only shortcuts), a per-layer attention-ratio figure, accuracy per arm,
overlays of the answer token's attention, and loss curves. Runs train `parallel` at a time, one thread each.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from swim.demos.common import mean_std

logger = logging.getLogger(__name__)

# arm -> extra training arguments; "control" trains on the moved targets
ARMS = {"ntp": ["--attn_weight", "0"], "klal": [], "control": []}
ARM_LABELS = {"ntp": "NTP only", "klal": "NTP + KLAL", "control": "NTP + KLAL, wrong cell"}
TARGET_GAP = 0.05  # the bar: KLAL beats NTP-only by >= 5 points in every seed


@dataclass
class KlalDemoConfig:
    kind: str = "klal"
    recipe: str = "klal_cpu.yaml"  # relative to the demo config's folder
    task: str = "grid_patch"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_train: int = 2000
    num_val: int = 300
    model: dict = field(default_factory=dict)  # swim.tiny.tiny_config_dict overrides
    synth: dict = field(default_factory=dict)  # swim.data.synth.klal.KlalSynthConfig fields
    max_steps: int | None = None  # override of the recipe's
    parallel: int = 2  # training runs at once (one thread each)
    control_min_shift: int = 2  # the control's targets move by at least this many cells (Chebyshev)
    overlays: int = 6  # held-out images drawn per arm (seed 0)
    eval_batch_size: int = 32
    max_new_tokens: int = 8
    quick: dict = field(default_factory=dict)  # overrides for --quick (tests)

    @classmethod
    def from_yaml(cls, path: str | Path, quick: bool = False) -> KlalDemoConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown KLAL demo settings {sorted(unknown)}")
        cfg = cls(**data)
        if quick:
            bad = set(cfg.quick) - {f.name for f in fields(cls)}
            if bad:
                raise ValueError(f"{path}: unknown settings in quick: {sorted(bad)}")
            cfg = cls(**{**data, **cfg.quick})
        cfg.recipe = str(Path(path).parent / cfg.recipe)
        if not Path(cfg.recipe).exists():
            raise ValueError(f"{path}: recipe {cfg.recipe} not found")
        return cfg


# ---------------------------------------------------------------------------------------------------------
# Data


def _entry_points(entry: dict) -> list[list[float]]:
    if "box" in entry:
        x0, y0, x1, y1 = entry["box"]
        return [[x0, y0], [x1, y1]]
    return entry.get("points") or entry.get("polyline") or []


def _shift_entry(entry: dict, dx: float, dy: float) -> dict:
    if "box" in entry:
        x0, y0, x1, y1 = entry["box"]
        return {"box": [x0 + dx, y0 + dy, x1 + dx, y1 + dy]}
    key = "points" if "points" in entry else "polyline"
    return {**entry, key: [[x + dx, y + dy] for x, y in entry[key]]}


def moved_targets(record: dict, rng: np.random.Generator, cell: int, min_shift: int) -> dict:
    """The record with its annotation translated by a whole number of cells, at least `min_shift` (Chebyshev),
    staying inside the image: the same task and answer, the supervision on a wrong place."""
    points = np.array([p for obj in record["annotation"] for e in obj.values() for p in _entry_points(e)])
    if points.size == 0:
        return record
    lo, hi = points.min(0), points.max(0)
    size = np.array([record["width"], record["height"]])
    low, high = np.ceil(-lo / cell).astype(int), np.floor((size - hi) / cell).astype(int)
    shifts = [(dx, dy) for dx in range(low[0], high[0] + 1) for dy in range(low[1], high[1] + 1)
              if max(abs(dx), abs(dy)) >= min_shift]  # fmt: skip
    if not shifts:
        return record
    dx, dy = shifts[int(rng.integers(len(shifts)))]
    annotation = [
        {f: _shift_entry(e, dx * cell, dy * cell) for f, e in obj.items()} for obj in record["annotation"]
    ]
    return {**record, "annotation": annotation}


def write_control(train_json: Path, seed: int, cell: int, min_shift: int) -> Path:
    records = json.loads(train_json.read_text())
    rng = np.random.default_rng([seed, 99])
    moved = [moved_targets(r, rng, cell, min_shift) for r in records]
    path = train_json.with_name("train_control.json")
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in moved) + "\n]\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Training


def _command(
    cfg: KlalDemoConfig, seed: int, arm: str, model_dir: Path, data: Path, run_dir: Path
) -> list[str]:
    cmd = [sys.executable, "-m", "swim.train", "--config", cfg.recipe, "--model_name_or_path", str(model_dir),
           "--data_config", str(data), "--output_dir", str(run_dir), "--seed", str(seed), "--data_seed", str(seed),
           *ARMS[arm]]  # fmt: skip
    if cfg.max_steps is not None:
        cmd += ["--max_steps", str(cfg.max_steps)]
    return cmd


def train_all(jobs: list[tuple[str, list[str], Path]], parallel: int) -> None:
    """Run the training commands, `parallel` at a time with one thread each; raise with the log's end if one
    fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < max(1, parallel):
            name, cmd, run_dir = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "w")  # noqa: SIM115 - closed when the process ends
            logger.info("training %s -> %s", name, run_dir)
            running.append(
                (name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, run_dir)
            )
        time.sleep(1)
        for item in list(running):
            name, proc, log, run_dir = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            if proc.returncode != 0:
                for _, other, other_log, _ in running:
                    other.kill()
                    other_log.close()
                tail = (run_dir / "train.log").read_text()[-3000:]
                raise RuntimeError(
                    f"training run {name} failed (exit {proc.returncode}); end of its log:\n{tail}"
                )


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_arm(
    run_dir: Path, val_json: Path, recipe: dict, data_args, cfg: KlalDemoConfig
) -> tuple[dict, tuple]:
    """Accuracy (greedy answers), attention ratio / pointing game on the supervised row, and held-out text loss."""
    from swim.data.collator import SwimCollator
    from swim.data.dataset import SwimDataset
    from swim.data.records import load_records
    from swim.demos.common import held_out_text_loss
    from swim.eval.answers import generate_answers, score_answers
    from swim.eval.generate import GenerationSettings, load_model
    from swim.eval.grounding import evaluate_grounding

    loaded = load_model(run_dir, dtype="fp32", device="cpu")
    model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
    settings = data_args.video_settings(family)
    generation = GenerationSettings(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                                    system_prompt=data_args.system_prompt, decode_workers=0)  # fmt: skip
    raw, answers = generate_answers(loaded, val_json, settings, generation)
    scored = score_answers(raw, answers)

    records, _ = load_records(val_json)
    dataset = SwimDataset(records, settings, tokenizer, strict=True, system_prompt=data_args.system_prompt,
                          family=family, query=data_args.attn_query)  # fmt: skip
    collate = SwimCollator(tokenizer.pad_token_id)
    samples = [dataset[i] for i in range(len(dataset))]
    batches = [
        collate(samples[i : i + cfg.eval_batch_size]) for i in range(0, len(samples), cfg.eval_batch_size)
    ]
    text_loss = held_out_text_loss(model, batches)
    grounding = evaluate_grounding(
        model, batches, recipe.get("attn_layers"), query_offset=recipe.get("attn_query_offset", 0),
        head_fusion=recipe.get("attn_head_fusion", "mean"),
    )  # fmt: skip
    fused = grounding["fused"]
    layers = {name: row["attn_ratio"] for name, row in grounding.items() if name != "fused"}
    result = {
        "accuracy": scored["accuracy"], "parse_failures": scored["parse_failures"], "errors": scored["errors"],
        "attn_ratio": fused["attn_ratio"], "attn_ratio_per_layer": layers, "pointing_game": fused["pointing_game"],
        "mask_mass": fused["mask_mass"], "text_loss": text_loss, "pairs": fused["pairs"],
        "chance_pointing_game": fused["chance_pointing_game"], "chance": scored["chance"],
        "answers": [row["answer"] for row in scored["rows"][:10]],
        **most_common_answer(scored["rows"]),
    }  # fmt: skip
    return result, (model, dataset)


def most_common_answer(rows: list[dict]) -> dict:
    """The answer an arm gives most often and its share of all answers: an arm that always says the same word
    scores the share of that word among the references, whatever it sees."""
    answers = Counter((row["answer"] or "").strip() for row in rows)
    answer, count = answers.most_common(1)[0]
    return {"most_common_answer": answer, "most_common_answer_share": count / len(rows)}


# ---------------------------------------------------------------------------------------------------------
# Report


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict:
    seeds = sorted(per_seed)
    metrics = ("accuracy", "attn_ratio", "pointing_game", "text_loss")
    summary = {arm: {m: dict(zip(("mean", "std"), mean_std([per_seed[s][arm][m] for s in seeds])))
                     for m in metrics} for arm in ARMS}  # fmt: skip
    gaps = {}
    for arm in ("klal", "control"):
        for m in ("accuracy", "attn_ratio", "pointing_game"):
            values = [per_seed[s][arm][m] - per_seed[s]["ntp"][m] for s in seeds]
            gaps[f"{arm} - ntp: {m}"] = {"per_seed": values, **dict(zip(("mean", "std"), mean_std(values)))}
    chance = {name: float(np.mean([per_seed[s]["ntp"]["chance"][name] for s in seeds]))
              for name in per_seed[seeds[0]]["ntp"]["chance"]}  # fmt: skip
    targets = {s: seed_targets(per_seed[s]) for s in seeds}
    return {
        "seeds": seeds, "summary": summary, "gaps": gaps, "chance": chance, "targets": targets,
        **{name: all(t[name] for t in targets.values()) for name in TARGETS},
    }  # fmt: skip


TARGETS = {
    "klal_beats_ntp_by_5_points": f"NTP + KLAL ≥ NTP only + {100 * TARGET_GAP:.0f} points",
    "both_above_majority": "NTP only and NTP + KLAL above the majority-answer chance",
    "control_not_better": f"the wrong-cell control below NTP only + {100 * TARGET_GAP:.0f} points (no KLAL-sized gain)",
}


def seed_targets(arms: dict[str, dict]) -> dict[str, bool]:
    """The demo's targets (`TARGETS`) for one seed's arms; the majority answer is that seed's held-out one."""
    majority = arms["ntp"]["chance"]["majority answer"]
    return {
        "klal_beats_ntp_by_5_points": arms["klal"]["accuracy"] - arms["ntp"]["accuracy"] >= TARGET_GAP,
        "both_above_majority": min(arms["ntp"]["accuracy"], arms["klal"]["accuracy"]) > majority,
        "control_not_better": arms["control"]["accuracy"] - arms["ntp"]["accuracy"] < TARGET_GAP,
    }


def figures(out: Path, per_seed: dict[int, dict[str, dict]], result: dict) -> list[Path]:
    """Per-layer attention ratio (Figure 4 style) and accuracy per arm with every seed and the chance levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(per_seed)
    layer_names = list(per_seed[seeds[0]]["ntp"]["attn_ratio_per_layer"]) + ["fused"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / len(ARMS)
    for k, arm in enumerate(ARMS):
        values = [[per_seed[s][arm]["attn_ratio_per_layer"].get(n, per_seed[s][arm]["attn_ratio"]) for s in seeds]
                  for n in layer_names]  # fmt: skip
        x = np.arange(len(layer_names)) + (k - 1) * width
        axes[0].bar(
            x, [np.mean(v) for v in values], width, yerr=[np.std(v) for v in values], label=ARM_LABELS[arm]
        )
        accuracy = [per_seed[s][arm]["accuracy"] for s in seeds]
        axes[1].bar(k, np.mean(accuracy), 0.6, color=f"C{k}")
        axes[1].scatter([k] * len(accuracy), accuracy, color="black", s=12, zorder=3)
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].set_xticks(range(len(layer_names)), layer_names, fontsize=8)
    axes[0].set_title("attention ratio on the supervised row (held-out; 1 = uniform)", fontsize=9)
    axes[0].legend(fontsize=7)
    for i, (name, value) in enumerate(result["chance"].items()):
        axes[1].axhline(value, color=f"C{i + 3}", lw=0.8, ls="--", label=f"chance: {name}")
    axes[1].set_xticks(range(len(ARMS)), [ARM_LABELS[a] for a in ARMS], fontsize=8)
    axes[1].set_title("held-out answer accuracy (bars: mean, dots: seeds)", fontsize=9)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    path = out / "attention_ratio_and_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def overlay_grid(handles: dict[str, tuple], count: int, recipe: dict, path: Path) -> Path:
    """Held-out images (columns) x arms (rows): the fused attention of the supervised row, target outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from swim.vis.attention import heat_overlay, mask_outline, record_maps

    arms = list(handles)
    dataset = handles[arms[0]][1]
    count = min(count, len(dataset))
    fig, axes = plt.subplots(
        len(arms) + 1, count, figsize=(1.9 * count, 2.0 * (len(arms) + 1)), squeeze=False
    )
    for c in range(count):
        record = dataset.records[c]
        maps = {arm: record_maps(model, data, c, recipe.get("attn_layers"), recipe.get("attn_query_offset", 0),
                                 recipe.get("attn_head_fusion", "mean")) for arm, (model, data) in handles.items()}  # fmt: skip
        first = maps[arms[0]]
        axes[0, c].imshow(first.frames[0])
        question = record.turns()[0].text.split("?")[0] + "?"
        axes[0, c].set_title("\n".join(textwrap.wrap(question, 30)), fontsize=6)
        for r, arm in enumerate(arms, start=1):
            image = heat_overlay(first.frames[0], maps[arm].maps["fused"][0])
            image[mask_outline(first.target[0], first.frames[0].shape[:2], threshold=1e-6)] = 255
            axes[r, c].imshow(image)
            if c == 0:
                axes[r, c].set_ylabel(ARM_LABELS[arm], fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(values: dict, metric: str, percent: bool = False) -> str:
    scale, digits = (100, 1) if percent else (1, 3)
    return f"{values[metric]['mean'] * scale:.{digits}f} ± {values[metric]['std'] * scale:.{digits}f}"


def write_report(
    out: Path, cfg: KlalDemoConfig, per_seed: dict, result: dict, images: list[Path], meta: dict
) -> None:
    seeds = result["seeds"]
    s = result["summary"]
    rows = [
        f"| {ARM_LABELS[arm]} | {_cell(s[arm], 'accuracy', True)} | {_cell(s[arm], 'attn_ratio')} | "
        f"{_cell(s[arm], 'pointing_game')} | {_cell(s[arm], 'text_loss')} |"
        for arm in ARMS
    ]
    per_seed_rows = []
    for seed in seeds:
        r = per_seed[seed]
        per_seed_rows.append(
            f"| {seed} | " + " | ".join(f"{100 * r[a]['accuracy']:.1f}" for a in ARMS)
            + f" | {100 * (r['klal']['accuracy'] - r['ntp']['accuracy']):+.1f} | "
            + f"{100 * (r['control']['accuracy'] - r['ntp']['accuracy']):+.1f} | "
            + " | ".join(f"{r[a]['attn_ratio']:.2f}" for a in ARMS)
            + " | " + " | ".join(f"{r[a]['pointing_game']:.3f}" for a in ARMS) + " |"
        )  # fmt: skip
    gaps = result["gaps"]
    gap_lines = "\n".join(
        f"| {name} | {', '.join(f'{v:+.3f}' for v in g['per_seed'])} | {g['mean']:+.3f} ± {g['std']:.3f} |"
        for name, g in gaps.items()
    )
    chance = ", ".join(f"{name} **{100 * value:.1f}%**" for name, value in result["chance"].items())
    pg_chance = np.mean([per_seed[sd]["ntp"]["chance_pointing_game"] for sd in seeds])
    acc_gap = gaps["klal - ntp: accuracy"]
    verdict = "\n".join(
        f"- {label}, in every seed: **{'met' if result[name] else 'not met'}** (seeds "
        f"{', '.join(f'{sd}: ' + ('yes' if result['targets'][sd][name] else 'no') for sd in seeds)})"
        for name, label in TARGETS.items()
    ) + (
        f"\n\nPaired KLAL − NTP accuracy gaps {', '.join(f'{100 * v:+.1f}' for v in acc_gap['per_seed'])} points "
        f"(mean {100 * acc_gap['mean']:+.1f} ± {100 * acc_gap['std']:.1f}); control − NTP: "
        f"{', '.join(f'{100 * v:+.1f}' for v in gaps['control - ntp: accuracy']['per_seed'])} points. Attention "
        f"ratio KLAL − NTP: mean {gaps['klal - ntp: attn_ratio']['mean']:+.2f}."
    )
    constant = "; ".join(
        f"{ARM_LABELS[arm]} " + ", ".join(
            f"{100 * per_seed[sd][arm]['most_common_answer_share']:.0f}% `{per_seed[sd][arm]['most_common_answer']}`"
            for sd in seeds
        ) for arm in ARMS
    )  # fmt: skip
    text = f"""# KLAL demo report: {cfg.task}, seeds {", ".join(map(str, seeds))}

A tiny random Qwen2.5-VL (`{json.dumps(cfg.model)}`) trained from scratch on {cfg.num_train} synthetic
`{cfg.task}` images (`{json.dumps(cfg.synth)}`; `swim data synth --task {cfg.task}`) per seed, three times with the
same recipe (`{Path(cfg.recipe).name}`), data order and {meta["steps"]} steps: **NTP only** (attn_weight 0), **NTP +
KLAL** (KL attention loss on the last answer token: {meta["settings"]}), and a **control** trained on targets moved
by ≥ {cfg.control_min_shift} cells to a wrong place. Held-out: {cfg.num_val} images per seed (drawn like the training
images). The seed sets the data, the initialisation and the data order. Wall time {meta["seconds"] / 60:.1f} min
({meta["train_seconds"] / 60:.1f} min training, {cfg.parallel} runs at a time, one thread each).

## Results (mean ± standard deviation over {len(seeds)} seeds, n − 1)

| arm | answer accuracy (%) | attention ratio | pointing game | held-out text loss |
|---|---|---|---|---|
{chr(10).join(rows)}

Chance levels of the answer: {chance}. Attention ratio: 1 for uniform attention; the pointing game of a random
token is {pg_chance:.3f}. Both are measured on the supervised row (the last answer token, through the row the recipe
supervises: offset {meta["offset"]}), fused over layers {meta["layers"]}, against the *true* targets (also for the
control).

Targets (the majority answer is each seed's own held-out figure):

{verdict}

The most common answer of each arm and its share of the answers, per seed (an arm that always gives the same
answer scores that answer's share of the references, whatever it sees): {constant}.

## Per seed

| seed | acc NTP | acc KLAL | acc control | KLAL − NTP | control − NTP | ratio NTP | ratio KLAL | ratio control | PG NTP | PG KLAL | PG control |
|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(per_seed_rows)}

Paired per-seed gaps (same data, initialisation and order):

| gap | per seed | mean ± std |
|---|---|---|
{gap_lines}

![attention ratio per layer and accuracy](attention_ratio_and_accuracy.png)

Loss curves (seed {seeds[0]}):

![loss curves](loss_curves.png)

The supervised row's attention on held-out images (seed {seeds[0]}; white: the target cell):

""" + "\n".join(f"![{p.stem}]({p.relative_to(out)})" for p in images) + "\n"  # fmt: skip
    (out / "report.md").write_text(text)
    report = {**result, "per_seed": per_seed, "demo_config": asdict(cfg), **meta}
    (out / "report.json").write_text(json.dumps(report, indent=1))


# ---------------------------------------------------------------------------------------------------------


def run_klal_demo(cfg: KlalDemoConfig, out: Path) -> dict:
    from swim.data.synth.klal import KlalSynthConfig, generate_task
    from swim.demos.common import loss_curves, recipe_data_args
    from swim.modeling.capture import supervised_layers
    from swim.tiny import build_tiny_checkpoint

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    synth = KlalSynthConfig(**cfg.synth)
    jobs, vals = [], {}
    for seed in cfg.seeds:
        seed_dir = out / f"seed_{seed}"
        paths = generate_task(
            seed_dir / "data", cfg.task, synth, seed, {"train": cfg.num_train, "val": cfg.num_val}
        )
        control = write_control(paths["train"], seed, synth.cell, cfg.control_min_shift)
        model_dir = build_tiny_checkpoint(seed_dir / "tiny", seed=seed, **cfg.model)
        vals[seed] = paths["val"]
        for arm in ARMS:
            data = control if arm == "control" else paths["train"]
            run_dir = seed_dir / arm
            jobs.append((f"seed {seed} / {arm}", _command(cfg, seed, arm, model_dir, data, run_dir), run_dir))
    train_start = time.time()
    train_all(jobs, cfg.parallel)
    train_seconds = time.time() - train_start

    data_args, recipe = recipe_data_args(cfg.recipe)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    per_seed, handles = {}, {}
    for seed in cfg.seeds:
        per_seed[seed] = {}
        for arm in ARMS:
            per_seed[seed][arm], handle = evaluate_arm(
                out / f"seed_{seed}" / arm, vals[seed], recipe, data_args, cfg
            )
            if seed == cfg.seeds[0]:
                handles[arm] = handle
            logger.info("seed %d / %s: accuracy %.3f, attention ratio %.2f, pointing game %.3f", seed, arm,
                        per_seed[seed][arm]["accuracy"], per_seed[seed][arm]["attn_ratio"],
                        per_seed[seed][arm]["pointing_game"])  # fmt: skip
    result = summarise(per_seed)
    figures(out, per_seed, result)
    loss_curves({ARM_LABELS[a]: out / f"seed_{cfg.seeds[0]}" / a for a in ARMS}, out / "loss_curves.png")
    overlays = [overlay_grid(handles, cfg.overlays, recipe, out / "overlays" / "val_attention.png")]
    state = json.loads((out / f"seed_{cfg.seeds[0]}" / "klal" / "trainer_state.json").read_text())
    settings = (
        f"{recipe.get('attn_target')} target (ring {recipe.get('attn_target_ring')}, masses "
        f"{recipe.get('attn_target_masses')}), layers {recipe.get('attn_layers')}, {recipe.get('attn_layer_fusion')} "
        f"layer fusion, {recipe.get('attn_head_fusion')} heads, λ {recipe.get('attn_weight')}"
    )
    meta = {"steps": state["global_step"], "seconds": time.time() - start, "train_seconds": train_seconds,
            "settings": settings, "offset": recipe.get("attn_query_offset", 0),
            "layers": supervised_layers(handles["klal"][0], recipe.get("attn_layers"))}  # fmt: skip
    write_report(out, cfg, per_seed, result, overlays, meta)
    logger.info("wrote %s and %s (%.1f min)", out / "report.md", out / "report.json", meta["seconds"] / 60)
    return {**result, "per_seed": per_seed}


def run_from_args(args) -> dict:
    """`swim demo --config recipes/klal_demo.yaml` (a config with `kind: klal`; swim.demos.cli)."""
    cfg = KlalDemoConfig.from_yaml(args.config, quick=args.quick)
    for key in ("max_steps", "num_train", "num_val", "seeds"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.num_shifted_val is not None:
        raise SystemExit("--num-shifted-val: the KLAL demo has no shifted split")
    return run_klal_demo(cfg, Path(args.out))
