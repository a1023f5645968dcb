"""KLAL's synthetic image tasks, generated from seeds: questions, answers and geometry annotations.

    swim data synth OUT_DIR --task grid_patch --num-train 2000 --num-val 500 [--seed 0 --cell-code ...]

The KL attention loss paper trains on Line Intersection, Line Tracing, Grid Patch, PixMo-Points and RefCOCO; it
does not publish their generators, sizes or prompts (docs/klal.md §4), so each task here is our
construction of what the paper names, on 224x224 images by default (an 8x8 grid of 28-px merged tokens for
Qwen2/2.5-VL):

- `grid_patch`: 4-8 coloured shapes, each inside its own grid cell. "Which cell has the green triangle?" ->
  `C5` (row letter A-H, column 1-8). Annotation: the object's centre point (its cell is the target). With
  `cell_code` every cell carries two small grey ticks whose positions encode its row and column, so a cell's token
  can tell where it is (a Qwen vision tower has no absolute position embedding; `_background`).
- `grid_size`: the same scenes, each shape drawn large (`object_size`) or small (`small_size`). "Is the green
  triangle small or large?" -> `large`. The distractors that share the target's colour or shape have the other
  size, so an answer read off one attribute, or off the scene as a whole, is a coin flip: only the named object
  tells; with `size_prior` the named shape makes one answer likelier (a language prior). A one-token answer
  read from the target's own cell: the Grid Patch question with an answer format a tiny model can learn
  (naming a cell needs the model to read where a token is, which a tiny model trained from scratch does not
  learn at CPU scale). Annotation: the object's centre point.
- `line_intersection`: a red and a blue polyline (2-3 segments). "How many times do the red and the blue line
  cross?" -> `0` / `1` / `2` (balanced). Annotation: the crossing points; a `0` record has none (what KLAL
  supervises then is not stated in the paper; here such a record trains the text only).
- `line_tracing`: 3-5 curves from letters on the left to numbers on the right. "Where does the line from B
  end?" -> `3` (chance 1/N). Annotation: the traced line (`tracing_target: path`) or its end point (`end`).
- `points`: a shapes scene. "Point to the blue square." -> `(x, y)` in pixels. Annotation: the object's centre
  point (PixMo-style); scored by whether the answer falls inside the object.
- `rec`: a shapes scene. "Give the box of the red circle." -> `[x0, y0, x1, y1]`. Annotation: the box; scored
  by IoU >= 0.5.

Every record is an image NL-Refer-style record (`image`, `conversations`, `annotation`, `height`, `width`) plus
`task`, `scorer` (`swim.eval.answers`), `choices` (the number of possible answers, where finite) and `scene`
(every object, for the shortcut chance levels); readers ignore the extra keys. Every image comes from its own RNG seeded by (seed, task, split, index): the output is
byte-identical for a seed and independent of generation order.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from swim.data.geometry import polyline_mask
from swim.data.synth.shapes import PALETTE, shape_mask

logger = logging.getLogger(__name__)

TASK_IDS = {"grid_patch": 0, "line_intersection": 1, "line_tracing": 2, "points": 3, "rec": 4, "grid_size": 5}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
ROWS = "ABCDEFGHIJKLMNOP"
LINE_COLOURS = ("red", "blue")


@dataclass
class KlalSynthConfig:
    size: int = 224  # image side in pixels
    cell: int = 28  # grid cell side (the model's merged token: 28 px for Qwen2/2.5-VL, 32 for Qwen3)
    min_objects: int = 4
    max_objects: int = 8
    object_size: int = 16  # shape side in pixels (grid_patch: must fit in a cell)
    small_size: int = 10  # grid_size: the side of a small shape (a large one is object_size)
    # grid_size: P(the named object is large) is 0.5 + size_prior for the first half of `shapes`, 0.5 - size_prior
    # for the rest: a language prior that a model can learn from the question alone, as real data has them
    size_prior: float = 0.0
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
    p_same_shape: float = 0.8  # P(a distractor with the target's shape), as in swim.data.synth
    p_same_colour: float = 0.8  # P(a distractor with the target's colour)
    cell_code: bool = False  # shape scenes: ticks in every cell encode its row and column (`_background`)
    line_width: tuple[int, int] = (2, 4)  # min, max line width in pixels
    curves: tuple[int, int] = (3, 5)  # line_tracing: min, max number of curves
    tracing_target: str = "path"  # line_tracing annotation: the traced line ("path") or its end point ("end")

    def __post_init__(self) -> None:
        if self.size % self.cell:
            raise ValueError(f"size {self.size} is not a multiple of the cell {self.cell}")
        if self.object_size > self.cell - 2 - (CODE_TOP if self.cell_code else 0):
            raise ValueError(f"object_size {self.object_size} does not fit in a {self.cell}-px cell")
        if self.cell_code and self.grid > self.cell // 2 - 2:
            raise ValueError(
                f"cell_code marks {self.grid} rows/columns in half a {self.cell}-px cell: too many"
            )
        if self.size // self.cell > len(ROWS):
            raise ValueError(f"at most {len(ROWS)} grid rows")
        unknown = [c for c in self.colours if c not in PALETTE]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; known: {sorted(PALETTE)}")
        if not 0 <= self.size_prior <= 0.5:
            raise ValueError(f"size_prior must be in [0, 0.5], got {self.size_prior}")
        if not 0 < self.small_size < self.object_size:
            raise ValueError(f"small_size {self.small_size} must be in (0, object_size {self.object_size})")
        if self.tracing_target not in ("path", "end"):
            raise ValueError(f"tracing_target must be 'path' or 'end', got {self.tracing_target!r}")
        if not 2 <= self.min_objects <= self.max_objects <= (self.size // self.cell) ** 2:
            raise ValueError(
                f"need 2 <= min_objects <= max_objects <= cells, got {self.min_objects}, {self.max_objects}"
            )

    @property
    def grid(self) -> int:
        return self.size // self.cell


def cell_name(row: int, col: int) -> str:
    """Grid cell name: row letter, then column number from 1 (`C5` = row 2, column 4)."""
    return f"{ROWS[row]}{col + 1}"


# ---------------------------------------------------------------------------------------------------------
# Scenes of shapes


def _attributes(rng: np.random.Generator, cfg: KlalSynthConfig, n: int) -> list[tuple[str, str]]:
    """(colour, shape) of the target (first) and n-1 distractors, all pairs distinct; with their probabilities a
    distractor shares the target's shape, another its colour (so one attribute alone is not enough)."""
    target = (cfg.colours[rng.integers(len(cfg.colours))], cfg.shapes[rng.integers(len(cfg.shapes))])
    chosen = [target]
    if rng.random() < cfg.p_same_shape:
        others = [c for c in cfg.colours if c != target[0]]
        chosen.append((others[rng.integers(len(others))], target[1]))
    if rng.random() < cfg.p_same_colour:
        others = [s for s in cfg.shapes if s != target[1]]
        chosen.append((target[0], others[rng.integers(len(others))]))
    free = [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) not in chosen]
    while len(chosen) < n and free:
        chosen.append(free.pop(int(rng.integers(len(free)))))
    return chosen[:n]


CODE_TOP = 5  # with `cell_code`, the top rows of every cell hold the code marks; shapes stay below them


def _background(cfg: KlalSynthConfig) -> np.ndarray:
    """Black, or with `cell_code` two grey 1x3-px ticks in the top rows of every cell: at x = 1 + row in the cell's
    left half and at x = cell / 2 + 1 + column in its right half. A mark's *position* changes the direction of the
    patch's embedding (a brightness code would not survive: Qwen's patch embedding has no bias and the merger
    RMS-normalises every patch), so the cell's token can carry where it is."""
    image = np.zeros((cfg.size, cfg.size, 3), np.uint8)
    if cfg.cell_code:
        for r in range(cfg.grid):
            for c in range(cfg.grid):
                y, x = r * cfg.cell + 1, c * cfg.cell
                image[y : y + 3, x + 1 + r] = 128
                image[y : y + 3, x + cfg.cell // 2 + 1 + c] = 128
    return image


def shapes_scene(
    rng: np.random.Generator, cfg: KlalSynthConfig, sized: bool = False
) -> tuple[np.ndarray, list[dict]]:
    """4-8 shapes, each inside its own grid cell (distinct cells, the target first) -> (image, objects). An
    object: colour, shape, cell [row, col], centre [x, y], box [x0, y0, x1, y1] (pixels); with `sized` also
    size ("small" / "large", `object_sizes`)."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = rng.choice(cfg.grid * cfg.grid, size=n, replace=False)
    image = _background(cfg)
    objects = []
    top = CODE_TOP if cfg.cell_code else 1  # keep a 1-px margin inside the cell (below the code marks)
    attributes = _attributes(rng, cfg, n)
    sizes = object_sizes(rng, attributes, p_large(cfg, attributes[0][1])) if sized else ["large"] * n
    for (colour, shape), size, index in zip(attributes, sizes, cells):
        side = cfg.object_size if size == "large" else cfg.small_size
        slack_x, slack_y = cfg.cell - side - 2, cfg.cell - side - top - 1
        row, col = divmod(int(index), cfg.grid)
        x = col * cfg.cell + 1 + int(rng.integers(slack_x + 1))
        y = row * cfg.cell + top + int(rng.integers(slack_y + 1))
        mask = shape_mask(shape, x, y, side, cfg.size)
        image[mask] = PALETTE[colour]
        ys, xs = np.nonzero(mask)
        objects.append({
            "colour": colour, "shape": shape, "cell": [row, col], "centre": [x + side / 2, y + side / 2],
            "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
            **({"size": size} if sized else {}),
        })  # fmt: skip
    return image, objects


SIZE_WORDS = ("small", "large")


def p_large(cfg: KlalSynthConfig, shape: str) -> float:
    """P(an object named by its `shape` is large): `size_prior` tilts the first half of the shapes to large."""
    first_half = cfg.shapes.index(shape) < len(cfg.shapes) // 2
    return 0.5 + cfg.size_prior if first_half else 0.5 - cfg.size_prior


def object_sizes(
    rng: np.random.Generator, attributes: list[tuple[str, str]], p_target_large: float
) -> list[str]:
    """The size of each object (the target first): the target's large with `p_target_large`, the other size for
    every distractor that shares its colour or its shape, at random for the rest."""
    target = int(rng.random() < p_target_large)
    sizes = [SIZE_WORDS[target]]
    for colour, shape in attributes[1:]:
        shares = colour == attributes[0][0] or shape == attributes[0][1]
        sizes.append(SIZE_WORDS[1 - target] if shares else SIZE_WORDS[int(rng.integers(2))])
    return sizes


def grid_patch(rng: np.random.Generator, cfg: KlalSynthConfig) -> tuple[np.ndarray, dict]:
    image, objects = shapes_scene(rng, cfg)
    target = objects[0]
    question = f"Which cell has the {target['colour']} {target['shape']}? Answer with the row letter and column number."
    return image, {
        "question": question, "answer": cell_name(*target["cell"]), "scorer": "exact", "choices": cfg.grid**2,
        "annotation": [{"0": {"points": [target["centre"]]}}], "scene": objects,
    }  # fmt: skip


def grid_size(rng: np.random.Generator, cfg: KlalSynthConfig) -> tuple[np.ndarray, dict]:
    image, objects = shapes_scene(rng, cfg, sized=True)
    target = objects[0]
    return image, {
        "question": f"Is the {target['colour']} {target['shape']} small or large?", "answer": target["size"],
        "scorer": "exact", "choices": len(SIZE_WORDS), "answer_key": "size",
        "annotation": [{"0": {"points": [target["centre"]]}}], "scene": objects,
    }  # fmt: skip


def points_task(rng: np.random.Generator, cfg: KlalSynthConfig) -> tuple[np.ndarray, dict]:
    image, objects = shapes_scene(rng, cfg)
    target = objects[0]
    x, y = (round(v) for v in target["centre"])
    return image, {
        "question": f"Point to the {target['colour']} {target['shape']}. Answer with (x, y) in pixels.",
        "answer": f"({x}, {y})", "scorer": "point", "annotation": [{"0": {"points": [target["centre"]]}}],
        "scene": objects,
    }  # fmt: skip


def rec_task(rng: np.random.Generator, cfg: KlalSynthConfig) -> tuple[np.ndarray, dict]:
    image, objects = shapes_scene(rng, cfg)
    target = objects[0]
    return image, {
        "question": f"Give the box of the {target['colour']} {target['shape']} as [x0, y0, x1, y1] in pixels.",
        "answer": json.dumps(target["box"]), "scorer": "box", "annotation": [{"0": {"box": target["box"]}}],
        "scene": objects,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Lines


def segment_crossings(a: np.ndarray, b: np.ndarray) -> list[tuple[float, float]]:
    """Proper crossing points of polylines `a` `[n, 2]` and `b` `[m, 2]` (segments that touch or are parallel
    do not count)."""
    points = []
    for p0, p1 in zip(a[:-1], a[1:]):
        for q0, q1 in zip(b[:-1], b[1:]):
            d = (p1[0] - p0[0]) * (q1[1] - q0[1]) - (p1[1] - p0[1]) * (q1[0] - q0[0])
            if abs(d) < 1e-9:
                continue
            t = ((q0[0] - p0[0]) * (q1[1] - q0[1]) - (q0[1] - p0[1]) * (q1[0] - q0[0])) / d
            u = ((q0[0] - p0[0]) * (p1[1] - p0[1]) - (q0[1] - p0[1]) * (p1[0] - p0[0])) / d
            if 0 < t < 1 and 0 < u < 1:
                points.append((float(p0[0] + t * (p1[0] - p0[0])), float(p0[1] + t * (p1[1] - p0[1]))))
    return points


def _polyline(rng: np.random.Generator, cfg: KlalSynthConfig) -> np.ndarray:
    n = int(rng.integers(3, 5))  # 2-3 segments
    margin = 12
    return np.round(rng.uniform(margin, cfg.size - margin, size=(n, 2)), 1)


def _draw_line(image: np.ndarray, points, width: float, colour) -> np.ndarray:
    mask = polyline_mask(points, width, image.shape[:2])
    image[mask] = colour
    return mask


def line_intersection(
    rng: np.random.Generator, cfg: KlalSynthConfig, tries: int = 500
) -> tuple[np.ndarray, dict]:
    """Two polylines with 0, 1 or 2 crossings (uniform); crossings at least 8 px from each other and from the
    lines' vertices, so that every crossing is visible."""
    wanted = int(rng.integers(3))
    for _ in range(tries):
        lines = [_polyline(rng, cfg) for _ in LINE_COLOURS]
        crossings = segment_crossings(*lines)
        if len(crossings) != wanted:
            continue
        vertices = np.concatenate(lines)
        close = any(np.hypot(*(vertices - c).T).min() < 8 for c in crossings) or (
            len(crossings) == 2 and math.dist(*crossings) < 8
        )
        if not close:
            break
    image = np.zeros((cfg.size, cfg.size, 3), np.uint8)
    widths = [int(rng.integers(cfg.line_width[0], cfg.line_width[1] + 1)) for _ in lines]
    for line, width, colour in zip(lines, widths, LINE_COLOURS):
        _draw_line(image, line, width, PALETTE[colour])
    points = [[round(x, 2), round(y, 2)] for x, y in crossings]
    return image, {
        "question": "How many times do the red and the blue line cross? Answer with a number.",
        "answer": str(len(crossings)), "scorer": "count", "choices": 3,
        "annotation": [{"0": {"points": points}}] if points else [],
        "scene": [{"colour": c, "polyline": line.tolist(), "width": w}
                  for c, line, w in zip(LINE_COLOURS, lines, widths)],
    }  # fmt: skip


def _font(size: int):
    return ImageFont.load_default(size=size)


def line_tracing(rng: np.random.Generator, cfg: KlalSynthConfig) -> tuple[np.ndarray, dict]:
    """N curves from letters on the left to numbers on the right, in one colour; the ends are a random
    permutation of the starts, so curves cross."""
    n = int(rng.integers(cfg.curves[0], cfg.curves[1] + 1))
    slots = np.linspace(24, cfg.size - 24, n)
    ends = rng.permutation(n)
    width = int(rng.integers(cfg.line_width[0], cfg.line_width[1] + 1))
    image = np.zeros((cfg.size, cfg.size, 3), np.uint8)
    curves = []
    left, right = 22.0, cfg.size - 22.0
    for i in range(n):
        # a smooth curve: the straight path plus a sine bump of random height
        xs = np.linspace(left, right, 12)
        ys = np.linspace(slots[i], slots[ends[i]], 12) + rng.uniform(-25, 25) * np.sin(
            np.linspace(0, np.pi, 12)
        )
        curve = np.stack([xs, np.clip(ys, 4, cfg.size - 4)], -1).round(1)
        _draw_line(image, curve, width, PALETTE["white"])
        curves.append(curve)
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for i in range(n):
        draw.text((6, slots[i]), ROWS[i], fill=PALETTE["yellow"], font=font, anchor="mm")
        draw.text((cfg.size - 6, slots[i]), str(i + 1), fill=PALETTE["yellow"], font=font, anchor="mm")
    start = int(rng.integers(n))
    path = curves[start]
    entry = (
        {"polyline": path.tolist(), "width": width}
        if cfg.tracing_target == "path"
        else {"points": [path[-1].tolist()]}
    )
    return np.asarray(canvas), {
        "question": f"Where does the line from {ROWS[start]} end? Answer with the number.",
        "answer": str(int(ends[start]) + 1), "scorer": "exact", "choices": n, "annotation": [{"0": entry}],
        "scene": [{"start": ROWS[i], "end": int(ends[i]) + 1, "polyline": c.tolist()} for i, c in enumerate(curves)],
    }  # fmt: skip


TaskGenerator = Callable[[np.random.Generator, KlalSynthConfig], tuple[np.ndarray, dict]]
TASKS: dict[str, TaskGenerator] = {
    "grid_patch": grid_patch,
    "grid_size": grid_size,
    "line_intersection": line_intersection,
    "line_tracing": line_tracing,
    "points": points_task,
    "rec": rec_task,
}


# ---------------------------------------------------------------------------------------------------------
# Writing


def task_record(image_rel: str, sample: dict, task: str, cfg: KlalSynthConfig) -> dict:
    extra = {key: sample[key] for key in ("choices", "answer_key") if key in sample}
    return {
        "image": image_rel,
        "task": task,
        "scorer": sample["scorer"],
        **extra,
        "conversations": [
            {"from": "human", "value": sample["question"]},
            {"from": "gpt", "value": sample["answer"]},
        ],
        "annotation": sample["annotation"],
        "height": cfg.size,
        "width": cfg.size,
        "scene": sample["scene"],
    }


def generate_task(
    out_dir: str | Path, task: str, cfg: KlalSynthConfig, seed: int, counts: dict[str, int]
) -> dict[str, Path]:
    """Write `counts` ({"train": N, "val": M, ...}) records of `task` under out_dir -> split -> JSON path."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {sorted(TASKS)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in counts.items():
        records = []
        for i in range(count):
            rng = np.random.default_rng([seed, TASK_IDS[task], SPLIT_IDS[split], i])
            image, sample = TASKS[task](rng, cfg)
            rel = f"images/{task}_{split}_{i:05d}.png"
            Image.fromarray(image).save(out / rel)
            records.append(task_record(rel, sample, task, cfg))
        paths[split] = out / f"{split}.json"
        paths[split].write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    (out / "synth_config.json").write_text(
        json.dumps({"task": task, "seed": seed, "counts": counts, **asdict(cfg)}, indent=1)
    )
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swim data synth --task", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    for f in fields(KlalSynthConfig):  # every knob is a flag: --cell-code, --line-width 2 4, ...
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif isinstance(f.default, tuple):
            kind = type(f.default[0])
            parser.add_argument(flag, nargs="+", type=kind, default=list(f.default))
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = _parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(KlalSynthConfig)}
    cfg = KlalSynthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    start = time.perf_counter()
    paths = generate_task(
        args.out_dir, args.task, cfg, args.seed, {"train": args.num_train, "val": args.num_val}
    )
    logger.info("wrote %d train / %d val %s records to %s in %.1f s", args.num_train, args.num_val, args.task,
                args.out_dir, time.perf_counter() - start)  # fmt: skip
    return paths
