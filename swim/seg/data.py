"""Segmentation targets next to the batch contract: `SegDataset` (per sample) and `collate_seg` (per batch).

Per sample with masks (`SegDataset.extend_sample`; keys added to the contract sample of docs/batch_contract.md):

| key | shape | meaning |
|---|---|---|
| `seg_pixel_values` | Float `[F, 3, S, S]` | the distinct sampled frames, square-resized for SAM-2 (ImageNet mean/std) |
| `seg_frame_group` | Long `[F]` | the Qwen temporal group of each frame (for the `swim_attn` prior) |
| `seg_frame_index` | Long `[F]` | the source frame index of each frame |
| `seg_masks` | Float `[O, F, m, m]` | per object and frame, area fraction of each low-resolution mask cell |
| `seg_valid` | Bool `[O, F]` | the object has a mask on that frame |
| `seg_query` | Long `[O]` | position of the object's query token (-1: none) |
| `seg_expr` | Long `[O, N]` | the text tokens the query has read after the video, last N (-1 padding): MBA keys |
| `seg_token_grid` | Long `[2]` | merged-token grid (gh, gw) of one temporal group |

The query token (`seg_query`): `ins_tag` — the last sub-token of the last occurrence of the object's tagged phrase
(an occurrence in the answer comes last, and it has read the whole question; a tag early in the question, "the
<ins>man</ins> holding the umbrella", has not yet read the rest under causal attention); `seg_token` — the k-th
`[SEG]` token, the conversation extended with one Sa2VA-style turn per object ("Please segment the {phrase}." →
"Sure, [SEG].") unless it already holds `[SEG]` (records written by `swim.data.rvos` do).

A sample without masks (text-only records, images) gets no `seg_*` keys; `collate_seg` returns None for a batch
without any, and the trainer still runs the head on a zero-weighted dummy so every rank does the same work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swim.data.collator import SwimCollator
from swim.data.dataset import SwimDataset
from swim.data.geometry import pool_mask
from swim.data.masks import MaskDecodeError, decode_segmentation
from swim.data.records import NLReferRecord, Record, Turn
from swim.data.tags import check_turn_tags, distinct_phrases, parse_tags
from swim.seg.sam2 import sam2_frames

SEG_TEMPLATE = ("Please segment the {phrase}.", "Sure, {token}.")


@dataclass
class SegDataConfig:
    image_size: int  # S: SAM-2's input side
    mask_size: int  # m: side of the low-resolution mask logits
    query: str = "ins_tag"
    seg_token: str = "[SEG]"
    max_frames: int = 0  # frames given to SAM-2 per sample (0: every distinct sampled frame)
    expr_tokens: int = 32


def with_seg_template(record: Record, token: str) -> Record:
    """The record with one "Please segment the {phrase}." / "Sure, [SEG]." exchange per tagged object appended
    (unchanged when it already contains `token`, or has no tagged phrase, or no `conversations`)."""
    if not getattr(record, "conversations", None) or any(token in t.text for t in record.turns()):
        return record
    first: dict[str, str] = {}
    for turn in record.turns():
        for span in parse_tags(turn.text)[1]:
            first.setdefault(" ".join(span.phrase.split()).casefold(), " ".join(span.phrase.split()))
    extra = []
    for phrase in distinct_phrases(check_turn_tags(record.turns())):
        extra += [Turn("user", SEG_TEMPLATE[0].format(phrase=first[phrase])),
                  Turn("assistant", SEG_TEMPLATE[1].format(token=token))]  # fmt: skip
    return dataclasses.replace(record, conversations=record.conversations + tuple(extra)) if extra else record


def query_record(video: str | Path, turns: Sequence[Turn], n_objects: int, source: str = "<query>",
                 index: str | None = None) -> NLReferRecord:  # fmt: skip
    """A record that asks for `n_objects` masks on `video` without any ground truth (inference, server-only splits):
    each object is annotated "not on any frame" (a null segmentation), which record files may not hold."""
    placeholder = tuple({"0": {"segmentation": None}} for _ in range(n_objects))
    return NLReferRecord(source=source, position=0, data_root=None, video=str(video), conversations=tuple(turns),
                         annotation=placeholder, index=index)  # fmt: skip


def query_positions(sample: dict, n_objects: int, mode: str, seg_token_id: int | None) -> torch.Tensor:
    """Long `[O]`: the query token of each object (see the module docstring), -1 where there is none."""
    out = torch.full((n_objects,), -1, dtype=torch.long)
    if mode == "seg_token":
        found = (sample["input_ids"] == seg_token_id).nonzero().flatten()[:n_objects]
        out[: found.numel()] = found
        return out
    for k in range(n_objects):
        rows = sample["query_positions"][sample["query_objects"] == k]
        if rows.numel():
            out[k] = rows.max()
    return out


def expression_positions(sample: dict, queries: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Long `[O, n_tokens]`: per object, the last `n_tokens` text positions after the last vision token up to its
    query token (inclusive), -1 padding (the query token itself is always among them)."""
    vision = (sample["mm_token_type_ids"] != 0).nonzero().flatten()
    start = int(vision.max()) + 1 if vision.numel() else 0
    out = torch.full((queries.numel(), n_tokens), -1, dtype=torch.long)
    for k, q in enumerate(queries.tolist()):
        if q >= 0:
            span = torch.arange(min(start, q), q + 1)[-n_tokens:]
            out[k, : span.numel()] = span
    return out


def pick_frames(frame_indices: list[int], annotated: set[int], limit: int) -> list[int]:
    """Positions (into `frame_indices`) of the frames given to SAM-2: the first occurrence of each distinct sampled
    frame; with `limit`, that many of them spread uniformly, annotated frames first."""
    first: dict[int, int] = {}
    for i, f in enumerate(frame_indices):
        first.setdefault(f, i)
    positions = list(first.values())
    if limit and len(positions) > limit:
        preferred = [i for i in positions if frame_indices[i] in annotated] or positions
        if len(preferred) < limit:
            preferred = positions
        chosen = np.linspace(0, len(preferred) - 1, limit).round().astype(int)
        positions = sorted({preferred[c] for c in chosen})
    return positions


class SegDataset(SwimDataset):
    """`SwimDataset` that also yields the segmentation targets of `swim.seg` (see the module docstring).

    Takes the `SwimDataset` arguments plus ``seg`` (`SegDataConfig`) and ``seg_token_id`` (`seg_token` queries).
    """

    keep_frames = True

    def __init__(self, *args, seg: SegDataConfig, seg_token_id: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if seg.query == "seg_token" and seg_token_id is None:
            raise ValueError(f"seg_query seg_token needs the id of {seg.seg_token!r} in the tokenizer")
        self.seg = seg
        self.seg_token_id = seg_token_id

    def build(self, record: Record) -> dict[str, torch.Tensor]:
        if self.seg.query == "seg_token":
            record = with_seg_template(record, self.seg.seg_token)
        return super().build(record)

    def extend_sample(self, sample: dict, record: Record, clip, supervise: bool) -> dict:
        if clip is None or not supervise or not record.annotation:
            return sample
        n_objects = len(record.annotation)
        queries = query_positions(sample, n_objects, self.seg.query, self.seg_token_id)
        if not (queries >= 0).any():
            self.skips.add(
                "seg_no_query", f"{record.source}:{record.position}: no query token for any object"
            )
            return sample
        tp = self.settings.temporal_patch_size
        annotated = {
            int(f) for obj in record.annotation for f, e in obj.items() if e.get("segmentation") is not None
        }
        positions = pick_frames(clip.frame_indices, annotated, self.seg.max_frames)
        masks, valid = self._masks(record, clip, positions)
        t, h, w = clip.grid_thw
        m = self.settings.merge_size
        sample.update(
            seg_pixel_values=sam2_frames(clip.frames[positions], self.seg.image_size),
            seg_frame_group=torch.tensor([p // tp for p in positions], dtype=torch.long),
            seg_frame_index=torch.tensor([clip.frame_indices[p] for p in positions], dtype=torch.long),
            seg_masks=masks,
            seg_valid=valid & (queries >= 0)[:, None],
            seg_query=queries,
            seg_expr=expression_positions(sample, queries, self.seg.expr_tokens),
            seg_token_grid=torch.tensor([h // m, w // m], dtype=torch.long),
        )
        return sample

    def _masks(self, record: Record, clip, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        side = self.seg.mask_size
        masks = torch.zeros(len(record.annotation), len(positions), side, side)
        valid = torch.zeros(len(record.annotation), len(positions), dtype=torch.bool)
        for o, obj in enumerate(record.annotation):
            entries = {int(k): e for k, e in obj.items()}
            for j, p in enumerate(positions):
                entry = entries.get(clip.frame_indices[p])
                if entry is None or entry.get("segmentation") is None:
                    continue
                try:
                    mask = decode_segmentation(entry["segmentation"], *clip.original_hw)
                except MaskDecodeError as e:
                    raise record.error(f"annotation[{o}]", f"cannot decode: {e}", "mask_decode") from None
                masks[o, j] = torch.from_numpy(pool_mask(mask, (side, side), merge_factor=1))
                valid[o, j] = True
        return masks, valid


def collate_seg(samples: list[dict]) -> dict[str, torch.Tensor] | None:
    """The batch's segmentation targets, or None when no sample has any (shapes: B samples, ΣF frames of all of them,
    F / O / N the largest per-sample counts):

    `pixel_values` Float `[ΣF, 3, S, S]`; `frame_index` Long `[B, F]` (row of `pixel_values`, -1 padding);
    `frame_group` Long `[B, F]`; `masks` Float `[B, O, F, m, m]`; `valid` Bool `[B, O, F]`; `query` Long `[B, O]`;
    `expr` Long `[B, O, N]`; `token_grid` Long `[B, 2]` (0 where the sample has no targets).
    """
    present = [b for b, s in enumerate(samples) if "seg_pixel_values" in s]
    if not present:
        return None
    b_n = len(samples)
    f_n = max(samples[b]["seg_pixel_values"].shape[0] for b in present)
    o_n = max(samples[b]["seg_query"].numel() for b in present)
    n_n = max(samples[b]["seg_expr"].shape[1] for b in present)
    side = samples[present[0]]["seg_masks"].shape[-1]
    out = {
        "pixel_values": torch.cat([samples[b]["seg_pixel_values"] for b in present]),
        "frame_index": torch.full((b_n, f_n), -1, dtype=torch.long),
        "frame_group": torch.full((b_n, f_n), -1, dtype=torch.long),
        "masks": torch.zeros(b_n, o_n, f_n, side, side),
        "valid": torch.zeros(b_n, o_n, f_n, dtype=torch.bool),
        "query": torch.full((b_n, o_n), -1, dtype=torch.long),
        "expr": torch.full((b_n, o_n, n_n), -1, dtype=torch.long),
        "token_grid": torch.zeros(b_n, 2, dtype=torch.long),
    }
    row = 0
    for b in present:
        s = samples[b]
        f, o = s["seg_pixel_values"].shape[0], s["seg_query"].numel()
        out["frame_index"][b, :f] = torch.arange(row, row + f)
        out["frame_group"][b, :f] = s["seg_frame_group"]
        out["masks"][b, :o, :f] = s["seg_masks"]
        out["valid"][b, :o, :f] = s["seg_valid"]
        out["query"][b, :o] = s["seg_query"]
        out["expr"][b, :o, : s["seg_expr"].shape[1]] = s["seg_expr"]
        out["token_grid"][b] = s["seg_token_grid"]
        row += f
    return out


@dataclass
class SegCollator(SwimCollator):
    """`SwimCollator` plus the batch's segmentation targets under `"seg"` (None when no sample has any)."""

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict:
        batch = super().__call__(samples)
        batch["seg"] = collate_seg(list(samples))
        return batch


def add_seg_token(tokenizer, model, token: str) -> int:
    """Add `token` (`seg_query: seg_token`) to the tokenizer as a special token and make room for it in the model's
    embeddings (a stock checkpoint with a larger vocabulary: still loadable by the stock class). Returns its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return token_id


def seg_data_config(seg, sam_path: str | None = None) -> SegDataConfig:
    """The data side of a `SegConfig`: SAM-2's input and mask sides read from its checkpoint's config."""
    from transformers import Sam2Config

    from swim.seg.sam2 import image_size, mask_size

    sam_config = Sam2Config.from_pretrained(sam_path or seg.seg_sam)
    return SegDataConfig(image_size=image_size(sam_config), mask_size=mask_size(sam_config), query=seg.seg_query,
                         seg_token=seg.seg_token, max_frames=seg.seg_max_frames,
                         expr_tokens=seg.mba_expr_tokens)  # fmt: skip
