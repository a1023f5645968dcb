"""Synthetic referring-video data: coloured shapes moving on black, with exact occlusion-aware masks.

    swim data synth OUT_DIR --seed 0 --num-train 200 --num-val 50 [--size 112 --frames 8 ...]
    swim data synth OUT_DIR --task grid_patch|line_intersection|line_tracing|points|rec ...   (swim.data.synth.klal)
    swim data synth OUT_DIR --format videorefer ...   raw VideoRefer-format input for `swim data build`

writes, with every path relative to OUT_DIR:
- `train.json`, `val.json`: NL-Refer-style records (`video`, `index`, `conversations`, `annotation`, `height`,
  `width`); the shape word of the referred object is tagged (`Describe the red <ins>circle</ins>.`) in the
  question only, and `annotation[k]` holds the masks of the k-th tagged object;
- `bench_q.json`: VideoRefer-Bench-Q-style multiple choice (`Question`, `type`, `options`, `Answer`), one
  generator per official question type;
- `bench_d.json`: VideoRefer-Bench-D-style descriptions (`conversations`, `caption`);
- `pretrain.json` (only when asked for): mask-free records naming every object of the video, for building a
  pretrained base (`swim pretrain`, docs/demo_design.md §7);
- `videos/*.mp4` (yuv420p, PyAV). Bench-Q can be written as JPEG frame folders instead, like the real
  DAVIS-based benchmark.

Each object's `(colour, shape)` is unique within a video, so "the red circle" is unambiguous, while
distractors of the same shape or the same colour make one attribute alone insufficient (docs/demo_design.md §1).
Every video is generated from its own RNG seeded by (seed, split, index): the output is byte-identical for a
given seed and independent of generation order.

A *shifted* held-out split (`val_shifted`) is the same task drawn differently, to see whether grounding learned
on the training distribution transfers: any `SynthConfig` knob can change for it — non-square frames (`height`),
more frames at another fps, more objects, more occlusion (`min_visible`), masks on only some frames
(`annotated_fraction`), and sentence templates never seen in training (`templates: shifted`). The demo's
`recipes/demo.yaml` fixes one such shift.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from swim.data.masks import encode_mask
from swim.data.records import BENCH_Q_TYPES
from swim.data.video import write_video

logger = logging.getLogger(__name__)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 90, 255),
    "yellow": (240, 220, 30),
    "purple": (170, 50, 220),
    "white": (235, 235, 235),
}
CROSS_HALF_WIDTH = 0.1  # the plus sign's bars are a fifth of the side wide
SHADES = {"bright": 1.0, "dark": 0.65}  # brightness factor of an object's colour
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")  # what `shape_mask` draws
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
EDGE = {"left": "the left edge", "right": "the right edge", "up": "the top edge", "down": "the bottom edge"}
SPLIT_IDS = {"train": 0, "val": 1, "bench_q": 2, "bench_d": 3, "val_shifted": 4, "pretrain": 5}
REFER_SPLITS = ("train", "val", "val_shifted")


@dataclass
class SynthConfig:
    size: int = 112  # frame width (and height unless `height` is set), pixels (even: yuv420p)
    height: int | None = None  # frame height for non-square frames (even)
    frames: int = 8
    fps: float = 2.0  # 8 frames at 2 fps -> second_per_grid_ts = 1.0 when all frames are sampled
    object_size: int = 22  # bounding-box side, pixels
    speed: float = 4.0  # pixels per frame
    min_distractors: int = 1
    max_distractors: int = 3
    p_same_shape: float = 0.8  # P(a distractor with the target's shape, another colour)
    p_same_colour: float = 0.8  # P(a distractor with the target's colour, another shape)
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    # per-object shades (of SHADES) drawn at random, e.g. ("bright", "dark"): a third attribute that the
    # reference never names, so that an answer about it needs the referred object told apart from its
    # distractors (docs/demo_design.md §7); () draws every object at full brightness
    shades: tuple[str, ...] = ()
    min_visible: float = 0.5  # every object keeps at least this fraction of its area visible in every frame
    qa_fraction: float = 0.25  # share of train/val records that are multiple-choice questions
    annotated_fraction: float = 1.0  # share of the frames whose masks are written (at least two per object)
    templates: str = "train"  # sentence templates: "train", or "shifted" (never used in training)
    codec: str = "libx264"
    crf: int = 18
    bench_q_frame_folders: bool = False  # write Bench-Q videos as JPEG folders (like DAVIS)
    placement_tries: int = 50

    def __post_init__(self) -> None:
        if self.size % 2 or self.frame_height % 2:
            raise ValueError(f"frame sides must be even for yuv420p, got {self.frame_height}x{self.size}")
        if self.templates not in TEMPLATES:
            raise ValueError(f"templates must be one of {sorted(TEMPLATES)}, got {self.templates!r}")
        if not 0 < self.annotated_fraction <= 1:
            raise ValueError(f"annotated_fraction must be in (0, 1], got {self.annotated_fraction}")
        unknown = [c for c in self.colours if c not in PALETTE]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; known: {sorted(PALETTE)}")
        unknown = [s for s in self.shades if s not in SHADES]
        if unknown or len(self.shades) == 1:
            raise ValueError(
                f"shades must be empty or at least two of {sorted(SHADES)}, got {list(self.shades)}"
            )
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}")
        if len(self.shapes) < 2 or len(self.colours) < 2:
            raise ValueError("need at least two shapes and two colours for distractors")
        travel = self.speed * (self.frames - 1) + self.object_size
        if travel > min(self.size, self.frame_height):
            raise ValueError(
                f"objects travel {travel:.0f} px, more than the {self.frame_height}x{self.size} frame"
            )

    @property
    def frame_height(self) -> int:
        return self.height if self.height is not None else self.size


@dataclass
class SceneObject:
    shape: str
    colour: str
    direction: str
    x0: float  # top-left corner of the bounding box at frame 0
    y0: float
    shade: str = ""  # one of SHADES, or "" (full brightness, not mentioned)
    masks: list[np.ndarray] = field(default_factory=list)  # visible (occlusion-aware) mask per frame

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def tagged(self) -> str:
        return f"{self.colour} <ins>{self.shape}</ins>"

    def position(self, t: int, speed: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return self.x0 + dx * speed * t, self.y0 + dy * speed * t


# ---------------------------------------------------------------------------------------------------------
# Rendering


def shape_mask(shape: str, x: float, y: float, side: int, size: int, height: int | None = None) -> np.ndarray:
    """bool [height, size]: pixels whose centre lies inside the shape with bounding box (x, y, side, side)."""
    height = size if height is None else height
    out = np.zeros((height, size), bool)
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))  # only the box's pixels need testing
    x1, y1 = min(size, math.ceil(x + side) + 1), min(height, math.ceil(y + side) + 1)
    if x0 >= x1 or y0 >= y1:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    u, v = (xx - x) / side, (yy - y) / side  # bounding-box coordinates in [0, 1]
    if shape == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    elif shape == "triangle":  # apex up
        inside = (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
    elif shape == "diamond":
        inside = np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5
    elif shape == "ring":  # a circle's outline, a fifth of the side thick
        r2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
        inside = (r2 <= 0.25) & (r2 >= 0.09)
    elif shape == "cross":  # a plus sign, bars a third of the side wide
        inside = (
            (u >= 0)
            & (u <= 1)
            & (v >= 0)
            & (v <= 1)
            & ((np.abs(u - 0.5) <= CROSS_HALF_WIDTH) | (np.abs(v - 0.5) <= CROSS_HALF_WIDTH))
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    out[y0:y1, x0:x1] = inside
    return out


def render(objects: list[SceneObject], cfg: SynthConfig) -> np.ndarray:
    """Draw objects in list order (later ones on top) -> uint8 [T, S, S, 3]; sets each object's visible masks."""
    video = np.zeros((cfg.frames, cfg.frame_height, cfg.size, 3), np.uint8)
    for obj in objects:
        obj.masks = []
    for t in range(cfg.frames):
        covered = np.zeros((cfg.frame_height, cfg.size), bool)
        visible = []
        for obj in reversed(objects):  # top-most first, so each mask excludes what covers it
            m = shape_mask(
                obj.shape, *obj.position(t, cfg.speed), cfg.object_size, cfg.size, cfg.frame_height
            )
            visible.append(m & ~covered)
            covered |= m
        for obj, m in zip(objects, reversed(visible), strict=True):
            obj.masks.append(m)
            video[t][m] = np.round(np.array(PALETTE[obj.colour]) * SHADES.get(obj.shade, 1.0)).astype(
                np.uint8
            )
    return video


# ---------------------------------------------------------------------------------------------------------
# Scenes


def _pick(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def object_attributes(rng: np.random.Generator, cfg: SynthConfig) -> list[tuple[str, str]]:
    """(shape, colour) of the target (first) and its distractors, all pairs distinct.

    The same-shape and the same-colour distractor are drawn with their probabilities and count towards the
    distractor number n ~ U[min_distractors, max_distractors] (both are kept even when n = 1); the remaining
    ones get random unused attribute pairs.
    """
    target = (_pick(rng, cfg.shapes), _pick(rng, cfg.colours))
    chosen = [target]
    if rng.random() < cfg.p_same_shape:
        chosen.append((target[0], _pick(rng, [c for c in cfg.colours if c != target[1]])))
    if rng.random() < cfg.p_same_colour:
        chosen.append((_pick(rng, [s for s in cfg.shapes if s != target[0]]), target[1]))
    n_total = 1 + int(rng.integers(cfg.min_distractors, cfg.max_distractors + 1))
    free = [(s, c) for s in cfg.shapes for c in cfg.colours if (s, c) not in chosen]
    while len(chosen) < n_total and free:
        chosen.append(free.pop(int(rng.integers(len(free)))))
    return chosen


def sample_scene(rng: np.random.Generator, cfg: SynthConfig) -> tuple[list[SceneObject], np.ndarray]:
    """-> (objects with the target first, video uint8 [T, S, S, 3]). Objects are drawn in a random depth order;
    positions are resampled until every object stays at least `min_visible` visible in every frame."""
    attributes = object_attributes(rng, cfg)
    area = {s: shape_mask(s, 0, 0, cfg.object_size, cfg.object_size + 2).sum() for s, _ in attributes}
    travel = cfg.speed * (cfg.frames - 1)
    for _ in range(cfg.placement_tries):
        objects = []
        for shape, colour in attributes:
            direction = _pick(rng, list(DIRECTIONS))
            dx, dy = DIRECTIONS[direction]
            span_x, span_y = cfg.size - cfg.object_size, cfg.frame_height - cfg.object_size
            x_lo, x_hi = max(0.0, -dx * travel), span_x - max(0.0, dx * travel)
            y_lo, y_hi = max(0.0, -dy * travel), span_y - max(0.0, dy * travel)
            x0, y0 = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
            shade = _pick(rng, cfg.shades) if cfg.shades else ""
            objects.append(SceneObject(shape, colour, direction, round(x0, 2), round(y0, 2), shade))
        order = rng.permutation(len(objects))
        video = render([objects[k] for k in order], cfg)
        min_frac = min(m.sum() / area[o.shape] for o in objects for m in o.masks)
        if min_frac >= cfg.min_visible:
            return objects, video
    logger.debug("no placement kept every object %.0f%% visible; using the last one", 100 * cfg.min_visible)
    return objects, video


# ---------------------------------------------------------------------------------------------------------
# Records

MOVES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
# (description templates, multiple-choice question) per template set; "shifted" is never used in training
TEMPLATES = {
    "train": (
        ("Describe the {ref}.", "What does the {ref} do in the video?", "How does the {ref} move?"),
        "Which way does the {ref} move?",
    ),
    "shifted": (
        ("Tell me where the {ref} is going.", "Follow the {ref}: what happens to it?", "Watch the {ref}."),
        "In which direction is the {ref} heading?",
    ),
}
SHADE_QUESTION = {"train": "Is the {ref} bright or dark?", "shifted": "How bright is the {ref}?"}
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


def annotation_of(obj: SceneObject, frames: set[int] | None = None) -> dict[str, dict]:
    """Frame-index string -> {"segmentation": compressed RLE}, for the frames (all, or `frames`) where the object
    is visible."""
    return {
        str(t): {"segmentation": encode_mask(m)}
        for t, m in enumerate(obj.masks)
        if m.any() and (frames is None or t in frames)
    }


def annotated_frames(rng: np.random.Generator, cfg: SynthConfig) -> set[int] | None:
    """The frames whose masks are written: all (None), or a random `annotated_fraction` of them (at least two)."""
    if cfg.annotated_fraction >= 1:
        return None
    n = max(2, round(cfg.annotated_fraction * cfg.frames))
    return {int(t) for t in rng.choice(cfg.frames, size=n, replace=False)}


def region_name(obj: SceneObject, t: int, cfg: SynthConfig) -> str:
    """Coarse 3x3 location of the object's centre at frame t ("top left", "centre", ...)."""
    x, y = obj.position(t, cfg.speed)
    col = ("left", "centre", "right")[min(2, int(3 * (x + cfg.object_size / 2) / cfg.size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * (y + cfg.object_size / 2) / cfg.frame_height))]
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def multiple_choice(rng: np.random.Generator, correct: str, others: list[str]) -> tuple[list[str], str]:
    """Shuffled "(A) ..." options and the correct one."""
    texts = [correct, *others]
    order = rng.permutation(len(texts))
    options = [f"({chr(65 + i)}) {texts[k]}" for i, k in enumerate(order)]
    return options, options[int(np.flatnonzero(order == 0)[0])]


def _direction_choice(
    rng: np.random.Generator, obj: SceneObject, phrases: dict[str, str]
) -> tuple[list[str], str]:
    return multiple_choice(
        rng, phrases[obj.direction], [phrases[d] for d in DIRECTIONS if d != obj.direction]
    )


def bench_q_question(
    rng: np.random.Generator, kind: str, objects: list[SceneObject], cfg: SynthConfig
) -> tuple[str, list[str], str, list[SceneObject]]:
    """-> (question with <ins> tags, options, answer, referred objects in tag order) for one question type."""
    if kind in ("Relationship Questions", "Reasoning Questions") and len(objects) < 2:
        raise ValueError(f"{kind} need two objects; set min_distractors >= 1")
    a, b = objects[0], objects[1 % len(objects)]
    if kind == "Basic Questions":
        options, answer = _direction_choice(rng, a, {d: m.capitalize() for d, m in MOVES.items()})
        return f"In which direction does the {a.tagged()} move?", options, answer, [a]
    if kind == "Sequential Questions":
        rel = {"left": "Further left", "right": "Further right", "up": "Higher up", "down": "Lower down"}
        options, answer = _direction_choice(rng, a, rel)
        return (
            f"Compared with the first frame, where is the {a.tagged()} in the last frame?",
            options,
            answer,
            [a],
        )
    if kind == "Relationship Questions":
        (xa, ya), (xb, yb) = a.position(0, cfg.speed), b.position(0, cfg.speed)
        rel = {
            "left": "To the left of it",
            "right": "To the right of it",
            "up": "Above it",
            "down": "Below it",
        }
        side = (
            ("right" if xa > xb else "left")
            if abs(xa - xb) >= abs(ya - yb)
            else ("down" if ya > yb else "up")
        )
        options, answer = multiple_choice(rng, rel[side], [v for k, v in rel.items() if k != side])
        question = f"In the first frame, where is the {a.tagged()} relative to the {b.tagged()}?"
        return question, options, answer, [a, b]
    if kind == "Reasoning Questions":
        same, opposite, perpendicular = (
            "In the same direction",
            "In the opposite direction",
            "At a right angle to it",
        )
        if a.direction == b.direction:
            correct = same
        elif OPPOSITE[a.direction] == b.direction:
            correct = opposite
        else:
            correct = perpendicular
        others = [t for t in (same, opposite, perpendicular, "It does not move") if t != correct]
        options, answer = multiple_choice(rng, correct, others)
        return f"How does the {a.tagged()} move compared with the {b.tagged()}?", options, answer, [a, b]
    if kind == "Future Predictions":
        options, answer = _direction_choice(rng, a, {d: e.capitalize() for d, e in EDGE.items()})
        question = f"If the {a.tagged()} keeps moving the same way, which edge of the frame will it reach?"
        return question, options, answer, [a]
    raise ValueError(f"unknown Bench-Q type {kind!r}")


def caption_of(objects: list[SceneObject], cfg: SynthConfig) -> str:
    """Ground-truth description of the target (objects[0]) for Bench-D."""
    a = objects[0]
    others = len(objects) - 1
    return (
        f"The {a.name} starts in the {region_name(a, 0, cfg)} of the frame and moves {MOVES[a.direction]} at a "
        f"steady pace, ending in the {region_name(a, cfg.frames - 1, cfg)}. "
        f"{others} other shape{'s' if others != 1 else ''} move{'s' if others == 1 else ''} around it."
    )


def refer_record(
    rng: np.random.Generator, objects: list[SceneObject], video: str, index: str, cfg: SynthConfig
) -> dict:
    """NL-Refer-style training record: a description, or with p=qa_fraction a multiple-choice question."""
    a = objects[0]
    describe, ask = TEMPLATES[cfg.templates]
    frames = annotated_frames(rng, cfg)
    if rng.random() < cfg.qa_fraction:
        if a.shade and rng.random() < 0.5:  # half of the questions ask for the shade
            options, answer = multiple_choice(
                rng, a.shade.capitalize(), [s.capitalize() for s in cfg.shades if s != a.shade]
            )
            ask = SHADE_QUESTION[cfg.templates]
        else:
            options, answer = _direction_choice(rng, a, {d: m.capitalize() for d, m in MOVES.items()})
        question = "\n".join([ask.format(ref=a.tagged()), *options, MC_SUFFIX])
        index = f"synth_qa_{index}"
    else:
        question = _pick(rng, describe).format(ref=a.tagged())
        shade = f"is {a.shade} and " if a.shade else ""
        answer = f"The {a.name} {shade}moves {MOVES[a.direction]}."
        index = f"synth_caption_{index}"
    return {
        "video": video,
        "index": index,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        "annotation": [annotation_of(a, frames)],
        "height": cfg.frame_height,
        "width": cfg.size,
        # every object of the scene, the referred one first: lets the demo measure shortcut baselines
        # (e.g. "find the named colour") against the same masks; readers ignore this key
        "scene": [
            {
                "colour": o.colour,
                "shape": o.shape,
                "direction": o.direction,
                "shade": o.shade,
                "annotation": annotation_of(o, frames),
            }
            for o in objects
        ],
    }


INVENTORY_QUESTION = "Which shapes are in the video?"


def inventory_record(objects: list[SceneObject], video: str, index: str, cfg: SynthConfig) -> dict:
    """Mask-free pretraining record (a LLaVA-Video-style conversation): every object named with its motion,
    ordered by colour (as in `cfg.colours`) then shape (`cfg.shapes`): "A red circle moving up and a blue
    square moving to the left." The answer depends on which (colour, shape, motion) triples are present, not
    on where they are, so learning it needs each object's colour bound to its shape and its motion."""
    order = sorted(objects, key=lambda o: (cfg.colours.index(o.colour), cfg.shapes.index(o.shape)))
    names = [f"a {o.shade + ' ' if o.shade else ''}{o.name} moving {MOVES[o.direction]}" for o in order]
    answer = (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + "."
    return {
        "video": video,
        "index": f"synth_inventory_{index}",
        "conversations": [
            {"from": "human", "value": f"<video>\n{INVENTORY_QUESTION}"},
            {"from": "gpt", "value": answer[0].upper() + answer[1:]},
        ],
    }


# ---------------------------------------------------------------------------------------------------------
# Writing


def _write_frames(folder: Path, video: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(video):
        Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=95)


def write_scene(
    out_dir: Path, name: str, video: np.ndarray, cfg: SynthConfig, *, frame_folder: bool = False
) -> str:
    """Write one rendered video as ``videos/<name>.mp4`` (or a JPEG frame folder); returns its relative path."""
    if frame_folder:
        rel = f"videos/{name}"
        _write_frames(out_dir / rel, video)
    else:
        rel = f"videos/{name}.mp4"
        write_video(out_dir / rel, video, cfg.fps, cfg.codec, cfg.crf if cfg.codec == "libx264" else None)
    return rel


def generate_split(out_dir: Path, split: str, count: int, seed: int, cfg: SynthConfig) -> list[dict]:
    """Render `count` videos of one split under out_dir/videos and return their records."""
    records = []
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
        objects, video = sample_scene(rng, cfg)
        name = f"{split}_{i:05d}"
        rel = write_scene(
            out_dir, name, video, cfg, frame_folder=split == "bench_q" and cfg.bench_q_frame_folders
        )
        mid = str(cfg.frames // 2)
        if split in REFER_SPLITS:
            records.append(refer_record(rng, objects, rel, name, cfg))
        elif split == "pretrain":
            records.append(inventory_record(objects, rel, name, cfg))
        elif split == "bench_q":
            kind = BENCH_Q_TYPES[i % len(BENCH_Q_TYPES)]
            question, options, answer, referred = bench_q_question(rng, kind, objects, cfg)
            records.append(
                {
                    "id": i,
                    "video": rel,
                    "Question": question,
                    "type": kind,
                    "options": options,
                    "Answer": answer,
                    "frame_idx": mid,
                    "annotation": [annotation_of(o) for o in referred],
                }
            )
        else:
            caption = caption_of(objects, cfg)
            question = f"Please give a detailed description of the {objects[0].tagged()} in the video."
            records.append(
                {
                    "id": i,
                    "video": rel,
                    "caption": caption,
                    "conversations": [
                        {"from": "human", "value": question},
                        {"from": "gpt", "value": caption},
                    ],
                    "frame_idx": mid,
                    "annotation": [annotation_of(objects[0])],
                }
            )
    return records


def generate(out_dir: str | Path, cfg: SynthConfig, seed: int, counts: dict[str, int]) -> dict[str, Path]:
    """Write every split in `counts` ({"train": N, "val": M, "bench_q": K, "bench_d": L, "pretrain": P});
    -> split -> JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in counts.items():
        records = generate_split(out, split, count, seed, cfg)
        paths[split] = out / f"{split}.json"
        # one record per line: valid JSON, diff-friendly, and compact RLE
        paths[split].write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    (out / "synth_config.json").write_text(
        json.dumps({"seed": seed, "counts": counts, **asdict(cfg)}, indent=1)
    )
    return paths
