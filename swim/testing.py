"""Hand-made model batches following docs/batch_contract.md, independent of swim.data (tests, benchmarks)."""

from __future__ import annotations

import torch

IM_START, IM_END, VISION_START, VISION_END, PAD = 1, 2, 9, 10, 0


def video_batch(config, samples, seed: int = 0) -> dict:
    """Right-padded batch. Each sample: dict(videos=[(t, h, w), ...], text=n_text_tokens, queries=[(offset, obj)],
    objects=n_objects). A query offset counts from the first text token after the last video. Object o's target
    is a fixed token (a different one per group) so the answer is known; a sample without queries has no masks.
    """
    g = torch.Generator().manual_seed(seed)
    video_id = config.video_token_id
    rows, pixels, grids = [], [], []
    for s in samples:
        ids = [IM_START, 40, 41, IM_END, IM_START, 42]
        for t, h, w in s["videos"]:
            ids += [VISION_START] + [video_id] * (t * h * w // 4) + [VISION_END]
            pixels.append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g))
            grids.append([t, h, w])
        text_start = len(ids)
        ids += [int(x) for x in torch.randint(20, 60, (s["text"],), generator=g)] + [IM_END]
        rows.append((ids, text_start))
    length = max(len(ids) for ids, _ in rows)
    b = len(samples)
    input_ids = torch.full((b, length), PAD)
    attention_mask = torch.zeros(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100)
    for i, (ids, text_start) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, text_start : len(ids)] = torch.tensor(ids[text_start:])
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        mm_token_type_ids=(input_ids == video_id).long() * 2,
        pixel_values_videos=torch.cat(pixels),
        video_grid_thw=torch.tensor(grids),
        second_per_grid_ts=torch.ones(len(grids)),
    )
    batch["grounding"] = grounding_targets(samples, rows)
    return batch


def grounding_targets(samples, rows) -> dict:
    n = max(1, max(len(s.get("queries", [])) for s in samples))
    n_obj = max(1, max(s.get("objects", 0) for s in samples))
    k = max(sum(t * h * w // 4 for t, h, w in s["videos"]) for s in samples)
    n_groups = max(sum(t for t, _, _ in s["videos"]) for s in samples)
    b = len(samples)
    out = dict(
        query_positions=torch.full((b, n), -1),
        query_objects=torch.full((b, n), -1),
        object_targets=torch.zeros(b, n_obj, k),
        object_group_valid=torch.zeros(b, n_obj, n_groups, dtype=torch.bool),
        video_token_group=torch.full((b, k), -1),
    )
    for i, (s, (_, text_start)) in enumerate(zip(samples, rows)):
        token, group = 0, 0
        for t, h, w in s["videos"]:
            per_group = h * w // 4
            for _ in range(t):
                out["video_token_group"][i, token : token + per_group] = group
                for o in range(s.get("objects", 0)):
                    # object o covers one cell (full) and half of the next one in every group
                    cell = token + (o * 3 + group) % per_group
                    out["object_targets"][i, o, cell] = 1.0
                    out["object_targets"][i, o, token + (o * 3 + group + 1) % per_group] = 0.5
                    out["object_group_valid"][i, o, group] = True
                token += per_group
                group += 1
        for j, (offset, obj) in enumerate(s.get("queries", [])):
            out["query_positions"][i, j] = text_start + offset
            out["query_objects"][i, j] = obj
    return out
