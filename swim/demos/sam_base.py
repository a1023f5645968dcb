"""A pretrained tiny SAM-2 for the segmentation demo, built once and cached by content:
``swim seg pretrain-sam2 --config recipes/seg_sam_base.yaml``.

Sa2VA starts from a released SAM-2, whose image encoder already tells objects and their kinds apart, and freezes
that encoder. The segmentation demo's tiny SAM-2 started from random weights instead: its encoder had to learn
shapes from the language-prompted mask loss alone within a few hundred steps, and its masks covered every object
of the named colour (docs/segmentation.md §6.8). This module gives the tiny SAM-2 a comparable start, on synthetic
scenes of its own seed, with two losses:

- **prompts -> masks**, as SAM is trained: an object's box (or one point inside it) -> that object's mask; several
  objects of one frame are prompted together, so that the prompt, not the image, decides the mask. Binary
  cross-entropy + Dice on the decoder's low-resolution logits against the mask's area fractions.
- **what covers each cell** (`label_weight` > 0), as a backbone is pretrained before SAM: a 1×1 classifier on the
  image embedding predicts each cell's class (background, the shape, or the colour-and-shape pair) against the
  classes' area shares. The classifier is discarded; only the encoder keeps what it learned.

No prompt is ever a word: the checkpoint can segment an object it is shown and its features name what is where,
but it cannot know which object a sentence means. The result is a stock `Sam2Model` folder under
``CACHE/sam2-<hash>`` with `sam_base.json` (settings, held-out IoU and cell accuracy, the loss curve), the hash
covering the config, the generator's source and `SAM_BASE_FORMAT`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

logger = logging.getLogger(__name__)

SAM_BASE_FORMAT = 1  # bump when the build changes what a cached checkpoint contains
DONE_FILE = "sam_base.json"


@dataclass
class SamBaseConfig:
    seed: int = 2000  # scenes, initialisation and training; disjoint from every demo seed
    size: int = 128  # SAM-2 input side (swim.seg.sam2.build_tiny_sam2)
    hidden: int = 64  # decoder width
    prompt: str = "box"  # "box": the object's bounding box; "point": one positive point inside it
    num_scenes: int = 1000  # scene pool (each gives frames × objects prompts)
    num_val: int = 200  # held-out prompts for the final IoU
    steps: int = 1500
    batch_size: int = 16  # frames per step
    prompts_per_frame: int = 3  # objects prompted on each frame
    learning_rate: float = 1.0e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of the steps
    lr_schedule: str = "constant"  # after the warm-up: "constant" or "cosine" (to 0)
    dice_weight: float = 1.0
    label_weight: float = 1.0  # > 0: also classify what covers each embedding cell (a backbone pretraining)
    labels: str = "colour_shape"  # the classes of that classifier: "colour_shape" (one per pair) or "shape"
    synth: dict = field(default_factory=dict)  # swim.data.synth.shapes.SynthConfig fields

    @classmethod
    def from_yaml(cls, path: str | Path) -> SamBaseConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown SAM-2 pretraining settings {sorted(unknown)}")
        return cls(**data)

    def content_hash(self) -> str:
        """12 hex digits over every setting, the synthetic generator's source and `SAM_BASE_FORMAT`."""
        from swim.data.synth import shapes

        generator = hashlib.sha256(Path(shapes.__file__).read_bytes()).hexdigest()
        settings = {**asdict(self), "generator": generator, "format": SAM_BASE_FORMAT}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------
# Prompts


def object_class(obj, synth, labels: str) -> int:
    """The class index of a scene object: its shape, or its (colour, shape) pair, in the config's lists."""
    shape = list(synth.shapes).index(obj.shape)
    if labels == "shape":
        return shape
    if labels == "colour_shape":
        return list(synth.colours).index(obj.colour) * len(synth.shapes) + shape
    raise ValueError(f"labels must be 'shape' or 'colour_shape', got {labels!r}")


def class_count(synth, labels: str) -> int:
    """Classes of the cell classifier, background included."""
    return 1 + len(synth.shapes) * (len(synth.colours) if labels == "colour_shape" else 1)


@dataclass
class ScenePool:
    """Pre-rendered scenes: frames uint8 `[N, T, H, W, 3]` and each object's visible masks Bool `[N, T, K, H, W]`
    (K: the most objects of any scene; absent objects are all-False)."""

    frames: np.ndarray
    masks: np.ndarray
    classes: np.ndarray  # int `[N, K]`: 1 + the index of each object's class (`object_class`; 0: absent)

    @classmethod
    def draw(cls, synth, count: int, seed: int, labels: str = "colour_shape") -> ScenePool:
        from swim.data.synth.shapes import sample_scene

        scenes = [sample_scene(np.random.default_rng([seed, i]), synth) for i in range(count)]
        k = max(len(objects) for objects, _ in scenes)
        frames = np.stack([video for _, video in scenes])
        n_frames, height, width = frames.shape[1:4]
        masks = np.zeros((count, n_frames, k, height, width), bool)
        classes = np.zeros((count, k), np.int64)
        for i, (objects, _) in enumerate(scenes):
            for j, obj in enumerate(objects):
                masks[i, :, j] = np.stack(obj.masks)
                classes[i, j] = 1 + object_class(obj, synth, labels)
        return cls(frames, masks, classes)

    def label_maps(self, scene: int, frame: int) -> np.ndarray:
        """Int `[H, W]`: the class of each pixel of one frame (0: background)."""
        out = np.zeros(self.masks.shape[-2:], np.int64)
        for j, label in enumerate(self.classes[scene]):
            out[self.masks[scene, frame, j]] = label
        return out


def sample_prompts(pool: ScenePool, rng: np.random.Generator, count: int, per_frame: int):
    """`count` frames, each with `per_frame` (point, mask) prompts: a random frame of a random scene, distinct
    objects visible there (repeated only when fewer are visible), a uniform point among each one's pixels (pixel
    centres, frame coordinates). Several prompts on one frame teach the decoder that the point, not the image,
    decides the mask. A box prompt (`prompt: box`) is built from the mask instead, in `prompted`. -> (frames uint8
    `[B, H, W, 3]`, points float `[B, n, 2]` as (x, y), masks Bool `[B, n, H, W]`, each frame's pixel classes int
    `[B, H, W]`, `ScenePool.label_maps`)."""
    frames, points, masks, labels = [], [], [], []
    while len(frames) < count:
        i, t = int(rng.integers(pool.frames.shape[0])), int(rng.integers(pool.frames.shape[1]))
        visible = [j for j in range(pool.masks.shape[2]) if pool.masks[i, t, j].any()]
        if not visible:
            continue
        chosen = rng.choice(visible, size=per_frame, replace=len(visible) < per_frame)
        frame_points = []
        for j in chosen:
            ys, xs = np.nonzero(pool.masks[i, t, j])
            k = int(rng.integers(len(xs)))
            frame_points.append((xs[k] + 0.5, ys[k] + 0.5))
        frames.append(pool.frames[i, t])
        points.append(frame_points)
        masks.append(pool.masks[i, t, chosen])
        labels.append(pool.label_maps(i, t))
    return np.stack(frames), np.asarray(points, np.float32), np.stack(masks), np.stack(labels)


def area_fractions(masks: np.ndarray, side: int) -> torch.Tensor:
    """Bool `[..., H, W]` -> float `[..., side, side]`: the share of each low-resolution cell the mask covers (the
    square resize SAM-2's frames get, then area pooling)."""
    lead = masks.shape[:-2]
    x = torch.as_tensor(masks, dtype=torch.float32).reshape(-1, 1, *masks.shape[-2:])
    x = F.interpolate(x, size=(4 * side, 4 * side), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(x, side)[:, 0].clamp(0, 1).reshape(*lead, side, side)


def bounding_boxes(masks: np.ndarray) -> np.ndarray:
    """Bool `[..., H, W]` -> float `[..., 4]`: (x0, y0, x1, y1) of each mask's pixels (x1, y1 exclusive)."""
    boxes = []
    for mask in masks.reshape(-1, *masks.shape[-2:]):
        ys, xs = np.nonzero(mask)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return np.asarray(boxes, np.float32).reshape(*masks.shape[:-2], 4)


def predict(sam, frames: np.ndarray, points: np.ndarray | None = None, boxes: np.ndarray | None = None):
    """Single-mask logits `[B, n, m, m]` of `sam` for n prompts per frame, each one positive point (x, y)
    (`points [B, n, 2]`) or one box (`boxes [B, n, 4]`), in frame pixels; and the image embedding `[B, C, h, h]`."""
    from swim.seg.sam2 import image_size, sam2_frames

    side = image_size(sam.config)
    h, w = frames.shape[1:3]
    scale = torch.tensor([side / w, side / h])
    prompt = {}
    if points is not None:
        prompt["input_points"] = (torch.as_tensor(points) * scale)[:, :, None, :]
        prompt["input_labels"] = torch.ones(*points.shape[:2], 1, dtype=torch.long)
    if boxes is not None:
        prompt["input_boxes"] = torch.as_tensor(boxes) * scale.repeat(2)
    out = sam(pixel_values=sam2_frames(frames, side), multimask_output=False, **prompt)
    return out.pred_masks[:, :, 0], out.image_embeddings[-1]


def prompted(sam, kind: str, frames: np.ndarray, points: np.ndarray, masks: np.ndarray):
    """`predict` with the prompt of `kind` ("point" or "box") built from the sampled point or the mask."""
    if kind == "point":
        return predict(sam, frames, points=points)
    if kind == "box":
        return predict(sam, frames, boxes=bounding_boxes(masks))
    raise ValueError(f"prompt must be 'point' or 'box', got {kind!r}")


def mean_iou(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean J (`swim.eval.segmentation.region_similarity`) of `logits > 0` against `target > 0.5`, `[B, m, m]`."""
    from swim.eval.segmentation import region_similarity

    pred, truth = (logits > 0).cpu().numpy(), (target > 0.5).cpu().numpy()
    return float(np.mean([region_similarity(p, t) for p, t in zip(pred, truth)]))


# ---------------------------------------------------------------------------------------------------------
# Build


def class_fractions(label_maps: np.ndarray, classes: int, side: int) -> torch.Tensor:
    """Int `[B, H, W]` class maps -> float `[B, classes, side, side]`: each class's share of every cell."""
    one_hot = F.one_hot(torch.as_tensor(label_maps), classes).permute(0, 3, 1, 2).numpy().astype(bool)
    return area_fractions(one_hot, side)


def label_loss(classifier: torch.nn.Module, embedding: torch.Tensor, target: torch.Tensor):
    """Soft cross-entropy of a 1×1 classifier on the image embedding `[B, C, h, h]` against class shares
    `[B, K, h, h]`, and the accuracy of its arg-max on the cells an object covers most of."""
    logits = classifier(embedding)
    loss = -(target * logits.log_softmax(1)).sum(1).mean()
    object_cells = target.argmax(1) > 0
    correct = (logits.argmax(1) == target.argmax(1))[object_cells]
    return loss, float(correct.float().mean()) if correct.numel() else float("nan")


def train_sam_base(cfg: SamBaseConfig, out_dir: Path) -> dict:
    """Pretrain a tiny random SAM-2 on class-agnostic prompts (+ the optional cell classifier of its image
    embedding, discarded afterwards); save a stock `Sam2Model` folder in `out_dir`."""
    from tqdm.auto import tqdm
    from transformers import Sam2Model
    from transformers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    from swim.data.synth.shapes import SynthConfig
    from swim.seg.losses import bce_sum, dice_sum
    from swim.seg.sam2 import embedding_size, mask_size, tie_positional_embeddings, tiny_sam2_config

    torch.manual_seed(cfg.seed)
    synth = SynthConfig(**cfg.synth)
    pool = ScenePool.draw(synth, cfg.num_scenes, cfg.seed, cfg.labels)
    held_out = ScenePool.draw(synth, max(1, cfg.num_val // 4), cfg.seed + 1, cfg.labels)
    sam = Sam2Model(tiny_sam2_config(cfg.size, cfg.hidden))
    with torch.no_grad():
        tie_positional_embeddings(sam)
    side, cells, classes = mask_size(sam.config), embedding_size(sam.config), class_count(synth, cfg.labels)
    # one mask token, in training and in evaluation: no stability-based switch to the multimask tokens (swim.seg.head)
    sam.mask_decoder.dynamic_multimask_via_stability = False
    # the heads SAM's own training uses but a single-mask, language-prompted head never reads stay untouched
    sam.mask_decoder.iou_prediction_head.requires_grad_(False)
    sam.mask_decoder.pred_obj_score_head.requires_grad_(False)
    classifier = torch.nn.Conv2d(cfg.hidden, classes, 1)  # not part of the checkpoint
    params = [p for p in sam.parameters() if p.requires_grad] + list(classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup * cfg.steps)
    if cfg.lr_schedule == "cosine":
        schedule = get_cosine_schedule_with_warmup(optimizer, warmup, cfg.steps)
    elif cfg.lr_schedule == "constant":
        schedule = get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")
    rng = np.random.default_rng(cfg.seed)
    sam.train()
    log = []
    for step in tqdm(range(1, cfg.steps + 1), desc="SAM-2 base", mininterval=10):
        frames, points, masks, label_maps = sample_prompts(pool, rng, cfg.batch_size, cfg.prompts_per_frame)
        logits, embedding = prompted(sam, cfg.prompt, frames, points, masks)
        logits, target = logits.flatten(0, 1), area_fractions(masks, side).flatten(0, 1)
        loss = (bce_sum(logits, target) + cfg.dice_weight * dice_sum(logits, target)) / len(logits)
        labels, label_accuracy = label_loss(
            classifier, embedding, class_fractions(label_maps, classes, cells)
        )
        if cfg.label_weight > 0:
            loss = loss + cfg.label_weight * labels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == cfg.steps:
            log.append({"step": step, "loss": float(loss.detach()), "iou": mean_iou(logits.detach(), target),
                        "label_accuracy": label_accuracy})  # fmt: skip
            logger.info("step %d: loss %.4f, batch IoU %.3f, label accuracy %.3f", step, log[-1]["loss"],
                        log[-1]["iou"], label_accuracy)  # fmt: skip
    sam.eval()
    with torch.no_grad():
        frames, points, masks, label_maps = sample_prompts(
            held_out, np.random.default_rng(cfg.seed + 1), cfg.num_val, 1
        )
        logits, embedding = prompted(sam, cfg.prompt, frames, points, masks)
        val_iou = mean_iou(logits.flatten(0, 1), area_fractions(masks, side).flatten(0, 1))
        val_labels = label_loss(classifier, embedding, class_fractions(label_maps, classes, cells))[1]
    sam.save_pretrained(out_dir)
    return {"held_out_iou": val_iou, "held_out_label_accuracy": val_labels if cfg.label_weight > 0 else None,
            "log": log}  # fmt: skip


def cached_sam_base(cfg: SamBaseConfig, cache_dir: str | Path) -> Path | None:
    path = Path(cache_dir) / f"sam2-{cfg.content_hash()}"
    return path if (path / DONE_FILE).exists() else None


def build_sam_base(cfg: SamBaseConfig, cache_dir: str | Path) -> Path:
    """The pretrained tiny SAM-2 of `cfg`: reused from `cache_dir` when built before, else built there and
    published by an atomic rename. Returns the stock `Sam2Model` folder."""
    from swim.demos.common import publish

    found = cached_sam_base(cfg, cache_dir)
    if found is not None:
        logger.info("pretrained SAM-2: reusing %s", found)
        return found
    final = Path(cache_dir) / f"sam2-{cfg.content_hash()}"
    work = Path(cache_dir) / f".build-sam2-{cfg.content_hash()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logger.info("pretrained SAM-2: building %s (cached for later runs)", final)
    start = time.time()
    result = train_sam_base(cfg, work)
    summary = {"hash": cfg.content_hash(), "config": asdict(cfg), "seconds": time.time() - start, **result}
    (work / DONE_FILE).write_text(json.dumps(summary, indent=2))
    publish(work, final, DONE_FILE)
    logger.info("pretrained SAM-2: %s (%.0f s, held-out IoU %.3f)", final, summary["seconds"],
                result["held_out_iou"])  # fmt: skip
    return final


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="swim seg pretrain-sam2", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="recipes/seg_sam_base.yaml")
    parser.add_argument(
        "--cache-dir", default="runs/cache", help="where checkpoints are kept, one folder per hash"
    )
    parser.add_argument("--steps", type=int, help="override the config (quick runs; changes the hash)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = SamBaseConfig.from_yaml(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    path = build_sam_base(cfg, args.cache_dir)
    print(path)
    return path


if __name__ == "__main__":
    main()
