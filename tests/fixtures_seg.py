"""Hand-made referring-segmentation datasets in their released layouts (MeViS, Ref-YouTube-VOS, RefCOCO) from
synthetic scenes with exact masks, and an untrained checkpoint with a segmentation head."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from swim.data.masks import encode_mask
from swim.data.synth.shapes import SynthConfig, sample_scene

CFG = SynthConfig(
    size=64,
    frames=4,
    object_size=16,
    speed=2.0,
    min_distractors=1,
    max_distractors=1,
    p_same_shape=1.0,
    p_same_colour=0.0,
)  # two objects per scene: the target and a same-shape distractor


def scenes(n: int, seed: int = 0):
    """n synthetic scenes: (objects with per-frame masks, frames uint8 [T, 64, 64, 3])."""
    return [sample_scene(np.random.default_rng([seed, i]), CFG) for i in range(n)]


def write_frames(folder: Path, video: np.ndarray) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{t:05d}" for t in range(len(video))]
    for name, frame in zip(names, video):
        Image.fromarray(frame).save(folder / f"{name}.jpg", quality=95)
    return names


def mevis_split(root: Path, n_videos: int = 2, masks: bool = True) -> Path:
    """`root/{JPEGImages, meta_expressions.json, mask_dict.json}`: per video one expression for each object and one
    for both (its ground truth is the union)."""
    meta, mask_dict, anno = {"videos": {}}, {}, 0
    for v, (objects, video) in enumerate(scenes(n_videos)):
        vid = f"vid{v}"
        names = write_frames(root / "JPEGImages" / vid, video)
        ids = []
        for obj in objects:
            mask_dict[str(anno)] = [encode_mask(m) if m.any() else None for m in obj.masks]
            ids.append(anno)
            anno += 1
        expressions = {
            str(k): {"exp": f"the {o.name}", "obj_id": [k], "anno_id": [ids[k]]}
            for k, o in enumerate(objects)
        }
        expressions[str(len(objects))] = {"exp": "both shapes", "obj_id": [0, 1], "anno_id": ids[:2]}
        meta["videos"][vid] = {"expressions": expressions, "frames": names}
    (root / "meta_expressions.json").write_text(json.dumps(meta))
    if masks:
        (root / "mask_dict.json").write_text(json.dumps(mask_dict))
    return root


def ytvos_root(root: Path, split: str = "train", n_videos: int = 2) -> Path:
    """`root/{meta_expressions/<split>/meta_expressions.json, <split>/JPEGImages, <split>/Annotations}` (palette PNGs,
    pixel value = object id 1, 2, ...)."""
    meta = {"videos": {}}
    for v, (objects, video) in enumerate(scenes(n_videos, seed=1)):
        vid = f"yt{v}"
        names = write_frames(root / split / "JPEGImages" / vid, video)
        (root / split / "Annotations" / vid).mkdir(parents=True)
        for t, name in enumerate(names):
            ids = np.zeros(video.shape[1:3], np.uint8)
            for k, obj in enumerate(objects):
                ids[obj.masks[t]] = k + 1
            png = Image.fromarray(ids, mode="P")
            png.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
            png.save(root / split / "Annotations" / vid / f"{name}.png")
        meta["videos"][vid] = {"expressions": {str(k): {"exp": f"the {o.name}", "obj_id": str(k + 1)}
                                               for k, o in enumerate(objects)}, "frames": names}  # fmt: skip
    (root / "meta_expressions" / split).mkdir(parents=True)
    (root / "meta_expressions" / split / "meta_expressions.json").write_text(json.dumps(meta))
    return root


def refcoco_root(root: Path, n_images: int = 2) -> Path:
    """`root/refcoco/{refs(unc).p, instances.json}` and `root/images/mscoco/images/train2014/*.jpg`: the first frame
    of synthetic scenes, one ref per object with two sentences, masks as COCO RLE."""
    images_dir = root / "images" / "mscoco" / "images" / "train2014"
    images_dir.mkdir(parents=True)
    refs, images, annotations = [], [], []
    for i, (objects, video) in enumerate(scenes(n_images, seed=2)):
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.fromarray(video[0]).save(images_dir / name, quality=95)
        images.append({"id": i, "file_name": name, "height": video.shape[1], "width": video.shape[2]})
        for obj in objects:
            ann_id = len(annotations)
            annotations.append({"id": ann_id, "image_id": i, "segmentation": encode_mask(obj.masks[0])})
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": i, "split": "val",
                         "sentences": [{"sent": f"the {obj.name}"}, {"sent": f"{obj.colour} {obj.shape}"}]})  # fmt: skip
    (root / "refcoco").mkdir()
    with (root / "refcoco" / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f)
    (root / "refcoco" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    return root


def seg_checkpoint(tiny_ckpt: Path, out: Path, sam_dir: Path, **head) -> Path:
    """The tiny LLM folder plus an untrained `seg_head/` (no training needed to test the evaluation plumbing)."""
    import torch
    from transformers import AutoConfig, Sam2Model

    from swim.seg.head import SegHead, SegHeadConfig

    shutil.copytree(tiny_ckpt, out)
    torch.manual_seed(0)
    hidden = AutoConfig.from_pretrained(tiny_ckpt).get_text_config().hidden_size
    SegHead(SegHeadConfig(llm_hidden=hidden, **head), Sam2Model.from_pretrained(sam_dir)).save_pretrained(
        out / "seg_head"
    )
    return out
