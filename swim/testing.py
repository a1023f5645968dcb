"""Hand-made model batches following docs/batch_contract.md, independent of swim.data (tests, benchmarks).

The token layout follows the model's family (`swim.modeling.families`): one contiguous run of video tokens per
video (Qwen2/2.5-VL), or per temporal group a text timestamp and its own vision_start..vision_end block
(Qwen3-VL, Qwen3.5).
"""

from __future__ import annotations

import torch

from swim.modeling.families import family_of

IM_START, IM_END, VISION_START, VISION_END, PAD = 1, 2, 9, 10, 0
TIMESTAMP = (55, 56)  # two ordinary text tokens standing in for "<t seconds>"

# `video_batch` samples: right-padded, unequal lengths, two tagged words on two objects in the first sample, two
# videos in the second (the capture tests' standard case).
PADDED_SAMPLES = [
    dict(videos=[(2, 4, 4)], text=6, queries=[(1, 0), (4, 1)], objects=2),
    dict(videos=[(2, 4, 8), (2, 4, 4)], text=9, queries=[(2, 0)], objects=1),
]


def video_batch(config, samples, seed: int = 0) -> dict:
    """Right-padded batch. Each sample: dict(videos=[(t, h, w), ...], text=n_text_tokens, queries=[(offset, obj)],
    objects=n_objects, images=[(h, w), ...]). Images come first, then videos (grids in patches). A query offset
    counts from the first text token after the last video. Object o's target is a fixed token (a different one
    per group: every image and every temporal group is a group) so the answer is known; a sample without queries
    has no masks.
    """
    family = family_of(config)
    g = torch.Generator().manual_seed(seed)
    video_id, image_id = config.video_token_id, config.image_token_id
    patch_dim = 3 * family.geometry.temporal_patch_size * family.geometry.patch_size**2
    m2 = family.geometry.merge_size**2
    rows, video_pixels, video_grids, image_pixels, image_grids = [], [], [], [], []
    for s in samples:
        ids, types = [IM_START, 40, 41, IM_END, IM_START, 42], [0] * 6
        for h, w in s.get("images", []):
            ids += [VISION_START] + [image_id] * (h * w // m2) + [VISION_END]
            types += [0] + [1] * (h * w // m2) + [0]
            image_pixels.append(torch.randn(h * w, patch_dim, generator=g))
            image_grids.append([1, h, w])
        for t, h, w in s["videos"]:
            blocks = [(list(TIMESTAMP), h * w // m2)] * t if family.timestamps else [([], t * h * w // m2)]
            for stamp, n in blocks:
                ids += stamp + [VISION_START] + [video_id] * n + [VISION_END]
                types += [0] * (len(stamp) + 1) + [2] * n + [0]
            video_pixels.append(torch.randn(t * h * w, patch_dim, generator=g))
            video_grids.append([t, h, w])
        text_start = len(ids)
        ids += [int(x) for x in torch.randint(20, 60, (s["text"],), generator=g)] + [IM_END]
        types += [0] * (s["text"] + 1)
        rows.append((ids, types, text_start))
    length = max(len(ids) for ids, _, _ in rows)
    b = len(samples)
    input_ids = torch.full((b, length), PAD)
    mm_token_type_ids = torch.zeros(b, length, dtype=torch.long)
    attention_mask = torch.zeros(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100)
    for i, (ids, types, text_start) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mm_token_type_ids[i, : len(ids)] = torch.tensor(types)
        attention_mask[i, : len(ids)] = 1
        labels[i, text_start : len(ids)] = torch.tensor(ids[text_start:])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                 mm_token_type_ids=mm_token_type_ids)  # fmt: skip
    if video_grids:
        batch.update(pixel_values_videos=torch.cat(video_pixels), video_grid_thw=torch.tensor(video_grids),
                     second_per_grid_ts=torch.ones(len(video_grids)))  # fmt: skip
    if image_grids:
        batch.update(pixel_values=torch.cat(image_pixels), image_grid_thw=torch.tensor(image_grids))
    batch = family.model_inputs(batch)
    batch["grounding"] = grounding_targets(samples, [(ids, start) for ids, _, start in rows], m2)
    return batch


def grounding_targets(samples, rows, m2: int = 4) -> dict:
    """The grounding dict of `video_batch`: groups are the sample's images (one each), then its videos' temporal
    groups, in sequence order; every group's tokens are laid out row-major on its merged grid."""
    m = int(round(m2**0.5))
    layouts = [_groups(s, m) for s in samples]  # per sample: [(merged height, merged width)] per group
    n = max(1, max(len(s.get("queries", [])) for s in samples))
    n_obj = max(1, max(s.get("objects", 0) for s in samples))
    k = max(sum(h * w for h, w in layout) for layout in layouts)
    n_groups = max(len(layout) for layout in layouts)
    b = len(samples)
    out = dict(
        query_positions=torch.full((b, n), -1),
        query_objects=torch.full((b, n), -1),
        object_targets=torch.zeros(b, n_obj, k),
        object_group_valid=torch.zeros(b, n_obj, n_groups, dtype=torch.bool),
        vision_token_group=torch.full((b, k), -1),
        vision_token_cell=torch.full((b, k, 2), -1),
    )
    for i, (s, layout, (_, text_start)) in enumerate(zip(samples, layouts, rows)):
        token = 0
        for group, (h, w) in enumerate(layout):
            per_group = h * w
            out["vision_token_group"][i, token : token + per_group] = group
            cells = torch.arange(per_group)
            out["vision_token_cell"][i, token : token + per_group] = torch.stack([cells // w, cells % w], -1)
            for o in range(s.get("objects", 0)):
                # object o covers one cell (full) and half of the next one in every group
                cell = token + (o * 3 + group) % per_group
                out["object_targets"][i, o, cell] = 1.0
                out["object_targets"][i, o, token + (o * 3 + group + 1) % per_group] = 0.5
                out["object_group_valid"][i, o, group] = True
            token += per_group
        for j, (offset, obj) in enumerate(s.get("queries", [])):
            out["query_positions"][i, j] = text_start + offset
            out["query_objects"][i, j] = obj
    return out


def _groups(sample, m: int) -> list[tuple[int, int]]:
    images = [(h // m, w // m) for h, w in sample.get("images", [])]
    return images + [(h // m, w // m) for t, h, w in sample["videos"] for _ in range(t)]
