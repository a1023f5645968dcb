"""`SwimCollator`: contract samples → one right-padded batch (``docs/batch_contract.md``).

Text tensors are padded to the longest sample; vision tensors are concatenated over the batch in sample
order (Qwen's layout). ``grounding`` is None unless some sample has a supervised query; otherwise it holds
the per-sample query/target tensors padded to the batch maxima (positions/objects -1, targets 0, validity
False, token groups -1). Samples with and without masks mix freely: a mask-less sample has an all -1 row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def pad_1d(seqs: Sequence[torch.Tensor], value, length: int | None = None) -> torch.Tensor:
    """[n_i] tensors -> [B, max n_i] (or ``length``), right-padded with ``value``."""
    n = max([len(s) for s in seqs] + [0]) if length is None else length
    dtype = seqs[0].dtype if seqs else torch.long
    out = torch.full((len(seqs), n), value, dtype=dtype)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return out


def pad_2d(mats: Sequence[torch.Tensor], value) -> torch.Tensor:
    """[r_i, c_i] tensors -> [B, max r_i, max c_i], padded with ``value`` at the end of both axes."""
    r = max(m.shape[0] for m in mats)
    c = max(m.shape[1] for m in mats)
    out = torch.full((len(mats), r, c), value, dtype=mats[0].dtype)
    for b, m in enumerate(mats):
        out[b, : m.shape[0], : m.shape[1]] = m
    return out


@dataclass
class SwimCollator:
    """Batch contract samples (any batch size ≥ 1; right padding).

    ``pad_token_id``: the tokenizer's pad id (``<|endoftext|>`` for Qwen). There is no truncation here (it
    could cut vision tokens or tagged words); bound the length with ``SwimDataset(max_length=...)``.
    """

    pad_token_id: int

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict:
        if not samples:
            raise ValueError("empty batch")
        ids = [s["input_ids"] for s in samples]
        length = max(len(x) for x in ids)
        batch: dict = {
            "input_ids": pad_1d(ids, self.pad_token_id, length),
            "attention_mask": pad_1d([torch.ones(len(x), dtype=torch.long) for x in ids], 0, length),
            "labels": pad_1d([s["labels"] for s in samples], IGNORE_INDEX, length),
            "mm_token_type_ids": pad_1d([s["mm_token_type_ids"] for s in samples], 0, length),
        }
        for key in (
            "pixel_values_videos",
            "video_grid_thw",
            "second_per_grid_ts",
            "pixel_values",
            "image_grid_thw",
        ):
            parts = [s[key] for s in samples if key in s]
            if parts:
                batch[key] = torch.cat(parts)
        batch["grounding"] = self.grounding(samples)
        return batch

    @staticmethod
    def grounding(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """The padded grounding dict, or None if no sample has a supervised query.

        Shapes: ``query_positions``/``query_objects`` [B, n], ``object_targets`` [B, O, K],
        ``object_group_valid`` [B, O, G], ``vision_token_group`` [B, K], ``vision_token_cell`` [B, K, 2].
        """
        empty_long = torch.zeros(0, dtype=torch.long)
        qpos = [s.get("query_positions", empty_long) for s in samples]
        if all(len(q) == 0 for q in qpos):
            return None
        qobj = [s.get("query_objects", empty_long) for s in samples]
        k = [int(s.get("vision_token_group", empty_long).numel()) for s in samples]
        targets = [s.get("object_targets", torch.zeros(0, k[b])) for b, s in enumerate(samples)]
        groups = [int(s["vision_token_group"].max()) + 1 if k[b] else 0 for b, s in enumerate(samples)]
        valid = [
            s.get("object_group_valid", torch.zeros(0, groups[b], dtype=torch.bool))
            for b, s in enumerate(samples)
        ]
        cells = [
            s.get("vision_token_cell", torch.zeros(k[b], 2, dtype=torch.long)) for b, s in enumerate(samples)
        ]
        return {
            "query_positions": pad_1d(qpos, -1),
            "query_objects": pad_1d(qobj, -1),
            "object_targets": pad_2d([t.float() for t in targets], 0.0),
            "object_group_valid": pad_2d([v.bool() for v in valid], False),
            "vision_token_group": pad_1d([s.get("vision_token_group", empty_long) for s in samples], -1),
            "vision_token_cell": pad_2d([c.long() for c in cells], -1),
        }
