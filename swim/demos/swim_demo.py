"""The demo: does attention supervision make a tiny model look at the referred object?

    make demo         # = swim demo --config recipes/demo.yaml --out runs/demo
    make demo-seeds   # = swim demo --config recipes/demo.yaml --seeds 0 1 2 3 4 7 11 --out runs/demo-seeds
    make demo-klal    # = swim demo --config recipes/klal_demo.yaml --out runs/demo-klal   (swim.demos.klal_demo)

Generates the synthetic shapes set, takes the pretrained tiny base of the config's `base` (built once and cached,
`swim.demos.pretrain`; without `base`, a tiny random Qwen2.5-VL), trains it twice with the same recipe, seed and
steps — NTP only (`attn_weight: 0`) and SWIM — evaluates attention grounding and the shade answers (the
task-level measure, `shade_answers`) of both runs and of the base itself on two held-out splits
(pointing game @1 on the merged token grid of each temporal group, fused over the supervised layers): one drawn
like the training data, and a shifted one (other frame size and aspect ratio, more frames, more objects and
occlusion, masks on only some frames, unseen sentence templates; `shifted` in the demo config), each with its
chance levels. Writes `report.md`, `report.json`, attention overlays (baseline vs SWIM) and loss curves to the
output folder. With `--seeds`, runs the whole demo once per seed (seed of the data, the model and training)
and writes a report with per-seed rows, mean ± standard deviation and the paired SWIM − NTP gaps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from swim.demos.common import evaluate_run, loss_curves, mean_std, recipe_data_args, run_seeds

logger = logging.getLogger(__name__)

RUNS = {"baseline": 0.0, "swim": None}  # attn_weight per run (None: the recipe's)
SPLITS = {"val": "held-out, drawn like the training data", "val_shifted": "held-out, shifted"}
# The demo's claim (issue "the demo's claim must hold across seeds"): per seed and on the training distribution.
TARGET_SWIM, TARGET_BASELINE, TARGET_MARGIN_OVER_COLOUR, TARGET_MEAN = 0.80, 0.40, 0.15, 0.85


@dataclass
class DemoConfig:
    recipe: str = "demo_cpu.yaml"  # relative to the demo config's folder
    recipe_overrides: dict = field(default_factory=dict)  # settings of `recipe` changed for both arms
    seed: int = 0
    num_train: int = 400
    num_val: int = 100
    model: dict = field(default_factory=dict)  # swim.tiny.tiny_config_dict overrides
    synth: dict = field(default_factory=dict)  # swim.data.synth.shapes.SynthConfig fields
    shifted: dict = field(default_factory=dict)  # SynthConfig overrides of the shifted held-out split
    num_shifted_val: int = 0  # videos of the shifted held-out split (0: none)
    max_steps: int | None = None  # override of the recipe's (for quick runs)
    base: str | None = None  # a `swim pretrain` config (relative to this file): start from its cached base
    cache_dir: str = "runs/cache"  # where pretrained bases are kept (swim.demos.pretrain)
    base_num_videos: int | None = (
        None  # overrides of the base's config (quick runs; another hash, another base)
    )
    base_max_steps: int | None = None
    overlays: int = 4
    parallel: bool = True  # train both runs at once, one thread each (2 cores)

    @classmethod
    def from_yaml(cls, path: str | Path) -> DemoConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown demo settings {sorted(unknown)}")
        cfg = cls(**data)
        cfg.recipe = str(Path(path).parent / cfg.recipe)  # relative to the demo config's folder
        if not Path(cfg.recipe).exists():
            raise ValueError(f"{path}: recipe {cfg.recipe} not found")
        if cfg.base is not None:
            cfg.base = str(Path(path).parent / cfg.base)
            if not Path(cfg.base).exists():
                raise ValueError(f"{path}: pretraining config {cfg.base} not found")
            if cfg.model:
                raise ValueError(f"{path}: `model` and `base` both set; the base's config fixes the model")
        if len(cfg.synth.get("shades") or ()) < 2:
            raise ValueError(
                f"{path}: synth.shades must name at least two shades; the task-level measure reads them"
            )
        return cfg


def train_runs(cfg: DemoConfig, out: Path, model_dir: Path, train_json: Path) -> dict[str, Path]:
    """Train the baseline and SWIM runs (in parallel on separate cores when `cfg.parallel`)."""
    procs = {}
    for name, weight in RUNS.items():
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "swim.train", "--config", cfg.recipe, "--model_name_or_path", str(model_dir),
               "--data_config", str(train_json), "--output_dir", str(run_dir), "--seed", str(cfg.seed),
               "--data_seed", str(cfg.seed)]  # fmt: skip
        if weight is not None:
            cmd += ["--attn_weight", str(weight)]
        for key, value in cfg.recipe_overrides.items():
            cmd += [f"--{key}", str(value)]
        if cfg.max_steps is not None:
            cmd += ["--max_steps", str(cfg.max_steps)]
        env = dict(os.environ, OMP_NUM_THREADS="1" if cfg.parallel else os.environ.get("OMP_NUM_THREADS", ""))
        env = {k: v for k, v in env.items() if v != ""}
        log = open(run_dir / "train.log", "w")  # noqa: SIM115 - closed after the process ends
        logger.info("training %s -> %s (log: %s)", name, run_dir, run_dir / "train.log")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        if not cfg.parallel:
            _wait(name, *procs[name], run_dir)
    if cfg.parallel:
        for name, (proc, log) in procs.items():
            _wait(name, proc, log, out / name)
    return {name: out / name for name in RUNS}


def _wait(name: str, proc: subprocess.Popen, log, run_dir: Path) -> None:
    code = proc.wait()
    log.close()
    if code != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training run {name!r} failed (exit {code}); end of its log:\n{tail}")


def colour_only_chance(val_json: Path, data_args, family, min_cover: float = 0.05) -> float | None:
    """Pointing game of a model that finds the named colour but not the shape: a random token among the cells
    covered by any object of the target's colour (needs the synthetic `scene` metadata)."""
    from swim.data.masks import object_group_targets
    from swim.data.video import probe_video, select_frame_indices, video_target_hw

    records = json.loads(val_json.read_text())
    if not records or "scene" not in records[0]:
        return None
    settings = data_args.video_settings(family)
    hits, total = 0.0, 0
    for rec in records:
        path = val_json.parent / rec["video"]
        info = probe_video(path, settings)
        target = rec["scene"][0]
        keep = sorted(int(f) for f in target["annotation"])
        indices = select_frame_indices(info.num_frames, info.fps, settings, keep)
        hw = video_target_hw(info.height, info.width, len(indices), settings)
        maps = {}
        for i, obj in enumerate(rec["scene"]):
            if obj["colour"] == target["colour"]:
                maps[i] = object_group_targets(
                    obj["annotation"], indices, (info.height, info.width), hw, merge_factor=settings.factor
                )
        goal, valid = maps[0]
        same_colour = sum(m >= min_cover for m, _ in maps.values()) > 0  # [G, cells]
        for g in range(len(valid)):
            candidates = same_colour[g]
            if valid[g] and candidates.any():
                hits += float((goal[g] >= min_cover)[candidates].mean())
                total += 1
    return hits / total if total else None


def shade_variants(record: dict, shades: tuple[str, ...]) -> dict[str, dict]:
    """shade -> a copy of a synthetic shapes record (`swim.data.synth.shapes.refer_record`) whose answer states
    that shade: "The red ring is dark and moves up." for a description, the option letter of that shade for a
    shade question. The true shade's copy equals the record; {} for a record that does not state the shade
    (a question about the motion)."""
    question, answer = (turn["value"] for turn in record["conversations"])
    if "\n(A) " in question:  # multiple choice: "(B) Dark" lines
        letters = {text: letter for letter, text in re.findall(r"^\(([A-Z])\) (.+)$", question, re.M)}
        if not all(shade.capitalize() in letters for shade in shades):
            return {}
        texts = {shade: f"({letters[shade.capitalize()]}) {shade.capitalize()}" for shade in shades}
    else:
        stated = re.match(r"^(The .+?) is (\w+) and (moves .+)$", answer)
        if stated is None or stated.group(2) not in shades:
            return {}
        texts = {shade: f"{stated.group(1)} is {shade} and {stated.group(3)}" for shade in shades}
    variants = {}
    for shade, text in texts.items():
        variant = json.loads(json.dumps(record))
        variant["conversations"][1]["value"] = text
        variants[shade] = variant
    return variants


def distractor_dependence(scene: list[dict], attribute: str = "shade") -> tuple[bool, float]:
    """(does an object of the target's colour differ from it in `attribute`, P(right) when answering with the
    `attribute` of a random object of the target's colour). `scene`: the synthetic record's objects, target
    first."""
    target, *others = scene
    same_colour = [o for o in others if o["colour"] == target["colour"]]
    agree = 1 + sum(o[attribute] == target[attribute] for o in same_colour)
    return agree < 1 + len(same_colour), agree / (1 + len(same_colour))


@torch.no_grad()
def shade_answers(model, dataset, val_json: Path, shades: tuple[str, ...]) -> dict:
    """The task-level measure: how often the model's most likely answer states the referred object's shade.

    The videos draw every object bright or dark at random and no question names the shade, so the answer must
    be read off the referred object. Every held-out record that states the shade (descriptions and shade
    questions) is scored once per shade (`shade_variants`); the prediction is the variant of least summed
    next-token loss. Reported over all of them and over the *distractor-dependent* ones, where an object of the
    target's colour has the other shade: answering those right needs the referred object told apart from the
    same-colour distractor. Chance levels: uniform (1 / number of shades) and, on the dependent records, a
    model that answers with the shade of a random object of the named colour.
    """
    from swim.data.collator import SwimCollator
    from swim.data.dataset import SwimDataset
    from swim.data.records import record_from_json

    records, dependent, colour_only = [], [], []
    variants, truth = [], []
    for position, record in enumerate(json.loads(val_json.read_text())):
        options = shade_variants(record, shades)
        if not options:
            continue
        needs_shape, by_colour = distractor_dependence(record["scene"])
        records.append(position)
        dependent.append(needs_shape)
        colour_only.append(by_colour)
        for shade in shades:
            variants.append(record_from_json(options[shade], source=val_json, index=position,
                                             data_root=str(val_json.parent)))  # fmt: skip
            truth.append(shade == record["scene"][0]["shade"])
    if not records:
        raise ValueError(f"{val_json}: no record states a shade; set `shades` in the demo's synth block")
    scored = SwimDataset(variants, dataset.settings, dataset.tokenizer, supervise_qa=True, strict=True,
                         system_prompt=dataset.system_prompt, pair_mode=dataset.pair_mode, family=dataset.family)  # fmt: skip
    collate = SwimCollator(dataset.tokenizer.pad_token_id)
    losses = []
    for start in range(0, len(scored), 16):
        batch = collate([scored[i] for i in range(start, min(len(scored), start + 16))])
        batch.pop("grounding", None)
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch, use_cache=False).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels.clamp(min=0), reduction="none"
        )
        losses += (token_loss * (labels != -100)).sum(1).tolist()
    n = len(shades)
    correct = [truth[n * k + min(range(n), key=lambda j: losses[n * k + j])] for k in range(len(records))]
    picked = [c for c, d in zip(correct, dependent) if d]
    return {
        "accuracy": sum(correct) / len(correct),
        "dependent_accuracy": sum(picked) / len(picked) if picked else float("nan"),
        "dependent_records": len(picked),
        "dependent_correct": picked,  # per dependent record, in the held-out file's order (paired across arms)
        "records": len(correct),
        "chance": 1 / n,
        "chance_colour_only_dependent": (
            sum(c for c, d in zip(colour_only, dependent) if d) / len(picked) if picked else float("nan")
        ),
    }


def paired_gap(first: list[bool], second: list[bool]) -> dict:
    """Accuracy gap of two models scored on the same items, first − second, with its paired standard error.

    `first`, `second`: per-item correctness, same items in the same order. Only the items where the two disagree
    move the gap: with `first_only` / `second_only` such items and n items, gap = (first_only − second_only) / n
    and SE = sqrt(first_only + second_only − n·gap²) / n (the standard error of the mean per-item difference).
    """
    if len(first) != len(second):
        raise ValueError(
            f"paired_gap: {len(first)} against {len(second)} items; both must score the same items"
        )
    n = len(first)
    first_only = sum(a and not b for a, b in zip(first, second))
    second_only = sum(b and not a for a, b in zip(first, second))
    if n == 0:
        return {"gap": float("nan"), "se": float("nan"), "first_only": 0, "second_only": 0, "n": 0}
    gap = (first_only - second_only) / n
    se = math.sqrt(max(first_only + second_only - n * gap * gap, 0.0)) / n
    return {"gap": gap, "se": se, "first_only": first_only, "second_only": second_only, "n": n}


METRIC_ROWS = [
    ("pointing_game", "pointing game @1"),
    ("pointing_game_at_k", "top-5 precision"),
    ("mask_mass", "attention mass on the object"),
    ("auc", "AUC"),
    ("nss", "NSS"),
    ("text_loss", "held-out text loss"),
]


ANSWER_ROWS = [
    ("accuracy", "shade answers, all"),
    ("dependent_accuracy", "shade answers, same-colour distractor of the other shade"),
]
COLUMNS = {"base": "pretrained base (zero-shot)", "baseline": "baseline (NTP only)", "swim": "SWIM"}


def _split_section(report: dict, split: str) -> str:
    result = report["splits"][split]
    arms = [name for name in COLUMNS if name in result]
    rows = [
        f"| {label} | " + " | ".join(f"{result[a][key]:.3f}" for a in arms) + " |"
        for key, label in METRIC_ROWS
    ]
    rows += [f"| {label} | " + " | ".join(f"{result[a]['answers'][key]:.3f}" for a in arms) + " |"
             for key, label in ANSWER_ROWS]  # fmt: skip
    answers, gap = result["swim"]["answers"], result["answers_gap"]
    colour = result["chance_colour_only"]
    colour_line = f"{colour:.3f}" if colour is not None else "n/a (no scene metadata)"
    return f"""### {SPLITS[split]} ({result["records"]} videos, {result["swim"]["pairs"]} (word token, temporal group) pairs)

| metric | {" | ".join(COLUMNS[a] for a in arms)} |
|---|{"---|" * len(arms)}
{chr(10).join(rows)}

Shade answers (the task-level measure, docs/demo_design.md §7): every answer that states the referred object's
shade (bright or dark; never named in the question) scored with each shade, the most likely one taken;
{answers["dependent_records"]} of {answers["records"]} have a same-colour distractor of the other shade. Chance:
{answers["chance"]:.3f}; answering with the shade of a random object of the named colour scores
{answers["chance_colour_only_dependent"]:.3f} on those. SWIM − NTP only on them: **{gap["gap"]:+.3f} ± {gap["se"]:.3f}**
(paired standard error; SWIM alone right on {gap["first_only"]}, NTP only alone on {gap["second_only"]}).

Chance levels for the pointing game: a uniformly random token **{result["chance"]:.3f}** (uniform attention puts
{result["swim"]["chance_mask_mass"]:.3f} of its mass on the object); a model that finds the *named colour* but not the shape
(random token among cells of any object of the target's colour) **{colour_line}** — the shortcut an honest reading
must compare against (docs/demo_design.md §2).
"""


def write_report(out: Path, report: dict, images: list[Path]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    sections = "\n".join(_split_section(report, split) for split in report["splits"])
    shift = report["demo_config"]["shifted"]
    shift_line = (
        f"The shifted split changes `{json.dumps(shift)}` of the synthetic generator (swim/data/synth/shapes.py).\n"
        if shift
        else ""
    )
    text = (
        f"""# SWIM demo report (seed {report["seed"]})

{report["start"]} fine-tuned on synthetic videos of coloured shapes, twice with the same recipe
(`{report["recipe"]}`), seed and {report["steps"]} steps: NTP only (baseline, attn_weight 0) and SWIM (next-token +
KL attention loss on the `<ins>`-tagged shape word). Maps: head mean, renormalised per temporal group, mean over
the supervised layers {report["layers"]}. Wall time {report["seconds"]:.0f} s.
{shift_line}
{sections}
{report["verdict"]}

![loss curves](loss_curves.png)

Held-out overlays, NTP-only baseline vs SWIM (first frame of each temporal group; white outline: the referred
object's mask):

"""
        + "\n".join(f"![{p.stem}]({p.relative_to(out)})" for p in images)
        + "\n"
    )
    (out / "report.md").write_text(text)


def seed_checks(report: dict) -> dict[str, bool]:
    """The demo's per-seed targets, on the training-distribution split."""
    b, s = report["baseline"]["pointing_game"], report["swim"]["pointing_game"]
    colour = report.get("chance_colour_only")
    answers = report["splits"]["val"]
    return {
        f"SWIM >= {TARGET_SWIM}": s >= TARGET_SWIM,
        f"NTP-only <= {TARGET_BASELINE}": b <= TARGET_BASELINE,
        f"SWIM >= colour-only + {TARGET_MARGIN_OVER_COLOUR}": colour is not None
        and s >= colour + TARGET_MARGIN_OVER_COLOUR,
        "SWIM's shade answers better than NTP-only's (distractor-dependent)": answers["swim"]["answers"][
            "dependent_accuracy"
        ]
        > answers["baseline"]["answers"]["dependent_accuracy"],
    }


def verdict(report: dict) -> str:
    b, s = report["baseline"]["pointing_game"], report["swim"]["pointing_game"]
    checks = seed_checks(report)
    met = "met" if all(checks.values()) else "not met"
    failed = [name for name, ok in checks.items() if not ok]
    line = f"Targets of this seed ({', '.join(checks)}): **{met}** (SWIM {s:.3f}, baseline {b:.3f}"
    colour = report.get("chance_colour_only")
    line += f", colour-only {colour:.3f})." if colour is not None else ")."
    if failed:
        line += f" Not met: {', '.join(failed)}."
    if "val_shifted" in report["splits"]:
        shifted = report["splits"]["val_shifted"]
        line += (
            f" On the shifted split: SWIM {shifted['swim']['pointing_game']:.3f}, baseline "
            f"{shifted['baseline']['pointing_game']:.3f}, colour-only {shifted['chance_colour_only']:.3f}."
        )
    return line


def run_demo(cfg: DemoConfig, out: Path) -> dict:
    """One seed: data -> tiny model -> two training runs -> evaluation on the held-out splits -> report."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # ---- data and model
    from swim.data.synth.shapes import SynthConfig, generate
    from swim.tiny import build_tiny_checkpoint

    paths = generate(
        out / "data", SynthConfig(**cfg.synth), cfg.seed, {"train": cfg.num_train, "val": cfg.num_val}
    )
    if cfg.num_shifted_val:
        shifted = SynthConfig(**{**cfg.synth, **cfg.shifted})
        paths |= generate(out / "data_shifted", shifted, cfg.seed, {"val_shifted": cfg.num_shifted_val})
    if cfg.base is not None:  # one fixed pretrained base for every seed and arm (swim.demos.pretrain)
        from swim.demos.pretrain import PretrainConfig, build_base

        base_cfg = PretrainConfig.from_yaml(cfg.base)
        base_cfg.num_videos = cfg.base_num_videos or base_cfg.num_videos
        base_cfg.max_steps = cfg.base_max_steps or base_cfg.max_steps
        model_dir = build_base(base_cfg, cfg.cache_dir)
    else:
        model_dir = build_tiny_checkpoint(out / "tiny", seed=cfg.seed, **cfg.model)

    # ---- train both runs
    run_dirs = train_runs(cfg, out, model_dir, paths["train"])

    # ---- evaluate on the held-out splits
    data_args, recipe = recipe_data_args(cfg.recipe, cfg.recipe_overrides)
    splits, handles = {}, {}
    for split in (s for s in SPLITS if s in paths):
        results = {}
        evaluated = {"base": model_dir, **run_dirs} if cfg.base is not None else run_dirs
        shades = tuple(cfg.synth.get("shades") or ())
        for name, run_dir in evaluated.items():
            results[name], handle = evaluate_run(run_dir, paths[split], recipe, data_args)
            results[name]["answers"] = shade_answers(*handle, paths[split], shades)
            handles.setdefault(split, {})[name] = handle
            logger.info("%s / %s: pointing game %.3f, shade answers %.3f (distractor-dependent %.3f)", split,
                        name, results[name]["pointing_game"], results[name]["answers"]["accuracy"],
                        results[name]["answers"]["dependent_accuracy"])  # fmt: skip
        family = handles[split]["swim"][1].family
        splits[split] = {
            **({"base": results["base"]} if "base" in results else {}),
            "baseline": results["baseline"],
            "swim": results["swim"],
            "chance": results["swim"]["chance_pointing_game"],
            "chance_colour_only": colour_only_chance(paths[split], data_args, family),
            "records": len(handles[split]["swim"][1]),
            # SWIM − NTP on the distractor-dependent shade answers, with its paired standard error
            "answers_gap": paired_gap(
                results["swim"]["answers"]["dependent_correct"],
                results["baseline"]["answers"]["dependent_correct"],
            ),
        }

    # ---- figures
    from swim.vis.attention import draw_grid, record_maps

    loss_curves(run_dirs, out / "loss_curves.png")
    images = []
    layers = recipe.get("attn_layers")
    for split, count in (
        ("val", min(cfg.overlays, cfg.num_val)),
        ("val_shifted", min(2, cfg.num_shifted_val)),
    ):
        for index in range(count):
            maps = {name: record_maps(model, dataset, index, layers) for name, (model, dataset) in
                    handles[split].items() if name in RUNS}  # fmt: skip
            rows = {"NTP-only baseline": maps["baseline"], "SWIM": maps["swim"]}
            record = handles[split]["swim"][1].records[index]
            images.append(draw_grid(rows, out / "overlays" / f"{split}_{index:05d}.png",
                                    title=record.turns()[0].text.splitlines()[0][:90]))  # fmt: skip

    # ---- report
    state = json.loads((run_dirs["swim"] / "trainer_state.json").read_text())
    main_split = splits["val"]
    report = {
        "seed": cfg.seed,
        "baseline": {k: main_split["baseline"][k] for k in ("pointing_game", "mask_mass", "text_loss")},
        "swim": {k: main_split["swim"][k] for k in ("pointing_game", "mask_mass", "text_loss")},
        "chance": main_split["chance"],
        "chance_colour_only": main_split["chance_colour_only"],
        "splits": splits,
        "seconds": time.time() - start,
        "recipe": cfg.recipe,
        "start": f"The pretrained tiny base `{model_dir}`" if cfg.base else "A tiny random Qwen2.5-VL",
        "steps": state["global_step"],
        "layers": layers,
        "val_records": cfg.num_val,
        "demo_config": asdict(cfg),
    }
    report["checks"] = seed_checks(report)
    report["verdict"] = verdict(report)
    write_report(out, report, images)
    logger.info("%s", report["verdict"])
    logger.info("wrote %s and %s (%.0f s)", out / "report.md", out / "report.json", report["seconds"])
    return report


def seeds_report(reports: list[dict], out: Path) -> dict:
    """Per-seed rows, mean ± sample standard deviation, paired gaps and chance levels -> report.md / .json."""
    columns = [  # (label, split, value of one seed's report)
        ("SWIM", "val", lambda r: r["splits"]["val"]["swim"]["pointing_game"]),
        ("NTP-only", "val", lambda r: r["splits"]["val"]["baseline"]["pointing_game"]),
        ("SWIM − NTP", "val", lambda r: r["splits"]["val"]["swim"]["pointing_game"]
         - r["splits"]["val"]["baseline"]["pointing_game"]),
        ("colour-only", "val", lambda r: r["splits"]["val"]["chance_colour_only"]),
        ("SWIM − colour-only", "val", lambda r: r["splits"]["val"]["swim"]["pointing_game"]
         - r["splits"]["val"]["chance_colour_only"]),
        ("random token", "val", lambda r: r["splits"]["val"]["chance"]),
        ("base zero-shot", "val", lambda r: r["splits"]["val"]["base"]["pointing_game"]),
        ("answers dep.: SWIM", "val", lambda r: r["splits"]["val"]["swim"]["answers"]["dependent_accuracy"]),
        ("answers dep.: NTP-only", "val", lambda r: r["splits"]["val"]["baseline"]["answers"]["dependent_accuracy"]),
        ("answers dep.: SWIM − NTP", "val", lambda r: r["splits"]["val"]["answers_gap"]["gap"]),
        ("answers dep.: SE of the gap", "val", lambda r: r["splits"]["val"]["answers_gap"]["se"]),
        ("answers dep.: colour-only", "val",
         lambda r: r["splits"]["val"]["swim"]["answers"]["chance_colour_only_dependent"]),
        ("shifted: SWIM", "val_shifted", lambda r: r["splits"]["val_shifted"]["swim"]["pointing_game"]),
        ("shifted: NTP-only", "val_shifted", lambda r: r["splits"]["val_shifted"]["baseline"]["pointing_game"]),
        ("shifted: SWIM − NTP", "val_shifted", lambda r: r["splits"]["val_shifted"]["swim"]["pointing_game"]
         - r["splits"]["val_shifted"]["baseline"]["pointing_game"]),
        ("shifted: colour-only", "val_shifted", lambda r: r["splits"]["val_shifted"]["chance_colour_only"]),
        ("shifted: random token", "val_shifted", lambda r: r["splits"]["val_shifted"]["chance"]),
    ]  # fmt: skip
    columns = [c for c in columns if all(c[1] in r["splits"] for r in reports)]
    if not all("base" in r["splits"]["val"] for r in reports):
        columns = [c for c in columns if c[0] != "base zero-shot"]
    values = {label: [get(r) for r in reports] for label, _, get in columns}
    summary = {label: dict(zip(("mean", "std"), mean_std(v))) for label, v in values.items()}
    per_seed_ok = [all(r["checks"].values()) for r in reports]
    mean_ok = summary["SWIM"]["mean"] >= TARGET_MEAN
    header = "| seed | " + " | ".join(label for label, *_ in columns) + " | per-seed targets |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for i, (r, ok) in enumerate(zip(reports, per_seed_ok)):
        cells = " | ".join(f"{values[label][i]:.3f}" for label, *_ in columns)
        missed = ", ".join(name for name, passed in r["checks"].items() if not passed)
        lines.append(f"| {r['seed']} | {cells} | {'met' if ok else 'not met: ' + missed} |")
    lines.append("| mean ± std | " + " | ".join(f"{summary[label]['mean']:.3f} ± {summary[label]['std']:.3f}"
                                                  for label, *_ in columns) + " | |")  # fmt: skip
    first = reports[0]
    text = f"""# SWIM demo over seeds {", ".join(str(r["seed"]) for r in reports)}

The whole demo (`{first["recipe"]}`, {first["steps"]} steps, {first["val_records"]} held-out videos) once per seed;
the seed sets the synthetic data and the training order (and, without a base, the tiny model's initialisation).
Pointing game @1 on the held-out splits, fused over the supervised layers {first["layers"]}; "SWIM − NTP" is the
paired gap within a seed. Standard deviations are over seeds (n − 1). Chance levels are per seed (each seed draws
its own held-out videos).

{chr(10).join(lines)}

Targets: in each seed SWIM ≥ {TARGET_SWIM}, NTP-only ≤ {TARGET_BASELINE}, SWIM ≥ colour-only +
{TARGET_MARGIN_OVER_COLOUR}, SWIM's shade answers better than NTP-only's where a same-colour distractor has the
other shade ("answers dep."); mean SWIM ≥ {TARGET_MEAN}. Per-seed targets met in
**{sum(per_seed_ok)} of {len(reports)}** seeds; mean SWIM {summary["SWIM"]["mean"]:.3f}
({"met" if mean_ok else "not met"}). Wall time per seed (both runs, evaluation, figures):
{", ".join(f"{r['seconds']:.0f} s" for r in reports)}.

Per-seed reports: {", ".join(f"[seed {r['seed']}](seed_{r['seed']}/report.md)" for r in reports)}.
"""
    result = {"seeds": [r["seed"] for r in reports], "values": values, "summary": summary,
              "per_seed_targets_met": per_seed_ok, "mean_target_met": mean_ok}  # fmt: skip
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    logger.info("seeds report: %s", out / "report.md")
    return result


def run_from_args(args) -> dict:
    """`swim demo` (swim.demos.cli) with a SWIM demo config: one run, or one per seed and a summary."""
    keys = (
        "max_steps",
        "num_train",
        "num_val",
        "num_shifted_val",
        "cache_dir",
        "base_num_videos",
        "base_max_steps",
    )
    return run_seeds(DemoConfig.from_yaml(args.config), args, keys, run_demo, seeds_report)
