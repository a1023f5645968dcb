"""`SwimDataset`: records → per-sample tensors of the batch contract (``docs/batch_contract.md``).

Per sample: probe the video (or open the images), run the shared record checks
(`swim.data.validate.check_record`), load the frames keeping every annotated frame
(`swim.data.video.load_video(keep=...)`) or each image (`load_image`, one group per image), render and align the
text in the model family's token layout (`swim.data.tags.build_text`, `swim.modeling.families`), choose the
supervised rows (``query``: the tagged words, or KLAL's answer tokens), and turn each object's masks, boxes,
points or polylines into per-token area fractions at the family's merged-token size
(`swim.data.masks.object_group_targets`), over all the sample's vision tokens.

Bad records never crash training. A Dataset must return something for every index, so on a bad record
(malformed record, missing/corrupt video or image, undecodable mask, mask size != video size, frame index beyond
the video, box/points/polyline outside the image, bad tags, too long) ``__getitem__(i)`` returns the next good record ``i+1, i+2, …`` (at most
``max_attempts`` tries, then it raises), remembers the bad index so it is not decoded again, and counts the
skip by reason in `SkipCounter` (logged every ``log_every`` skips and by `SwimDataset.log_skips`; with
DataLoader workers each worker counts its own). A tag/object count mismatch is not a skip: the sample keeps
its text loss, drops attention supervision, and is counted as ``supervision_dropped:tag_count``. Tagged
tokens that straddle a tag edge (supervised whole) are counted per record type in `SwimDataset.stats`.
``strict=True`` raises the first problem as `RecordError` (file, record index, field, reason).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from swim.data.masks import MaskDecodeError, annotated_frames, object_group_targets
from swim.data.records import Record, RecordError
from swim.data.tags import QUERY_MODES, SWIM_SYSTEM_PROMPT, TagError, build_text
from swim.data.validate import MediaInfo, check_record, probe_media, turn_field
from swim.data.video import ImageInput, VideoDecodeError, VideoSettings, load_image, load_video
from swim.modeling.families import FamilySpec, family_of

logger = logging.getLogger(__name__)


class SkipCounter:
    """Counts skipped records (and dropped supervision) by reason; logs a summary every ``log_every``."""

    def __init__(self, log_every: int = 100):
        self.counts: Counter[str] = Counter()
        self.log_every = log_every
        self._n = 0

    def add(self, code: str, err: Exception | str) -> None:
        first = code not in self.counts
        self.counts[code] += 1
        self._n += 1
        if first:
            logger.warning("data problem (%s, first of its kind): %s", code, err)
        if self.log_every and self._n % self.log_every == 0:
            self.log()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{code}: {n}" for code, n in self.counts.most_common()) or "none"

    def log(self) -> None:
        if self.counts:
            logger.warning("data problems so far: %s", self.summary())


class SwimDataset(Dataset):
    """Lazily turns records into contract samples (see the module docstring for the skip policy).

    ``records``: records from `swim.data.records.load_records` or `swim.data.mixture.load_mixture` (their
    ``data_root`` is already set). ``supervise_qa``: give NL-Refer QA records attention supervision too (the
    official code trains them text-only). ``pair_mode``: how the two frames of a temporal group combine into
    one target (``"union"``; see `swim.data.masks`). ``max_length``: skip longer samples (None: no limit).
    ``family``: the model family (`swim.modeling.families`; default Qwen2.5-VL), whose geometry ``settings``
    must have (use ``family.video_settings(...)``); images use its ``min_pixels``..``max_pixels``. ``query``:
    which tokens are supervised (`swim.data.tags.QUERY_SELECTORS`: ``tags``, ``answer_last``, ``answer_all``).
    """

    def __init__(
        self,
        records: Sequence[Record],
        settings: VideoSettings,
        tokenizer,
        *,
        strict: bool = False,
        system_prompt: str | None = SWIM_SYSTEM_PROMPT,
        supervise_qa: bool = False,
        pair_mode: str = "union",
        max_length: int | None = None,
        max_attempts: int = 20,
        log_every: int = 100,
        family: FamilySpec | None = None,
        query: str = "tags",
    ):
        if not records:
            raise ValueError("SwimDataset needs at least one record")
        if query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {query!r}")
        self.family = family or family_of("qwen2_5_vl")
        geometry = self.family.geometry
        mismatched = [
            f"{name} {getattr(settings, name)} != {getattr(geometry, name)}"
            for name in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
            if tuple(np.atleast_1d(getattr(settings, name))) != tuple(np.atleast_1d(getattr(geometry, name)))
        ]
        if mismatched:
            raise ValueError(
                f"video settings do not match the {self.family.name} geometry ({'; '.join(mismatched)}): "
                f"build them with family.video_settings(...)"
            )
        self.records = list(records)
        self.settings = settings
        self.tokenizer = tokenizer
        self.strict = strict
        self.system_prompt = system_prompt
        self.supervise_qa = supervise_qa
        self.pair_mode = pair_mode
        self.max_length = max_length
        self.query = query
        self.max_attempts = max_attempts
        self.skips = SkipCounter(log_every)
        self.stats: Counter[str] = Counter()  # e.g. "straddling_tokens:NLReferRecord"
        self._bad: set[int] = set()
        self._probes: dict[tuple[Path, ...], MediaInfo] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self.records)
        tried = 0
        for step in range(n):
            j = (i + step) % n
            if j in self._bad:
                continue
            try:
                return self.build(self.records[j])
            except RecordError as e:
                if self.strict:
                    raise
                self._bad.add(j)
                self.skips.add(e.code, e)
            tried += 1
            if tried >= self.max_attempts:
                break
        raise RuntimeError(
            f"{tried} bad records in a row from index {i} (skips so far: {self.skips.summary()}); "
            "run `swim validate` on the data"
        )

    def log_skips(self) -> None:
        """Log the skip summary (call at the end of training)."""
        logger.info("SwimDataset: %d records, skipped/dropped: %s", len(self), self.skips.summary())
        if self.stats:
            logger.info(
                "SwimDataset statistics: %s", ", ".join(f"{k}: {n}" for k, n in sorted(self.stats.items()))
            )

    # ------------------------------------------------------------------------------------------------------

    def build(self, record: Record) -> dict[str, torch.Tensor]:
        """The contract sample of one record; raises `RecordError` (with a ``code``) for a bad record."""
        supervise = not record.text_only(self.supervise_qa)
        info = self._probe(record)  # cached per video / image set
        # A tag/object count mismatch only drops supervision (counted below), it does not skip the record.
        problems = check_record(
            record,
            info,
            decode_masks=False,
            supervise_qa=self.supervise_qa,
            masks=supervise,
            query=self.query,
        )
        problems = [p for p in problems if p.code != "tag_count"]
        if problems:
            raise problems[0]

        kind, files = record.media_files
        sample: dict[str, torch.Tensor] = {}
        if kind == "video":
            keep = (
                sorted({f for obj in record.annotation for f in annotated_frames(obj)}) if supervise else []
            )
            try:
                clip = load_video(files[0], self.settings, keep=keep, keep_frames=self.keep_frames)
            except (VideoDecodeError, ValueError) as e:
                raise record.error("video", f"cannot decode: {e}", "unreadable_video") from None
            grid = clip.grid_thw
            spans = [self.family.video_span(grid, clip.frame_indices, clip.source_fps)]
            sample["pixel_values_videos"] = clip.pixel_values
            sample["video_grid_thw"] = torch.tensor([grid], dtype=torch.long)
            if self.family.second_per_grid_ts:
                sample["second_per_grid_ts"] = torch.tensor([clip.second_per_grid_ts], dtype=torch.float32)
            sources = [
                _Frames(
                    clip.frame_indices, clip.original_hw, clip.resized_hw, self.settings.temporal_patch_size
                )
            ]
        else:
            images = [self._load_image(record, path, i, len(files)) for i, path in enumerate(files)]
            spans = [self.family.image_span(image.grid_thw) for image in images]
            sample["pixel_values"] = torch.cat([image.pixel_values for image in images])
            sample["image_grid_thw"] = torch.tensor([image.grid_thw for image in images], dtype=torch.long)
            sources = [_Frames([i], image.original_hw, image.resized_hw, 1) for i, image in enumerate(images)]

        try:
            text = build_text(
                self.tokenizer,
                record.turns(),
                media=spans,
                n_objects=len(record.annotation) if supervise else 0,
                supervise=supervise,
                system_prompt=self.system_prompt,
                query=self.query,
            )
        except TagError as e:
            raise record.error(turn_field(record, e.turn or 0), e.reason, "tags") from None
        if self.max_length is not None and len(text.input_ids) > self.max_length:
            raise record.error(
                "<sample>", f"{len(text.input_ids)} tokens > max_length {self.max_length}", "too_long"
            )
        if text.straddling:
            self.stats[f"straddling_tokens:{type(record).__name__}"] += text.straddling
        if text.skip_reason:
            self.skips.add(
                "supervision_dropped:tag_count", f"{record.source}:{record.position}: {text.skip_reason}"
            )

        sample.update(
            input_ids=text.input_ids,
            labels=text.labels,
            mm_token_type_ids=text.mm_token_type_ids,
            query_positions=text.query_positions,
            query_objects=text.query_objects,
        )
        grids = [source.grid(self.settings.factor) for source in sources for _ in range(source.groups)]
        sample["vision_token_group"], sample["vision_token_cell"] = token_layout(grids)
        if len(text.query_positions) > 0:
            targets, valid = self._targets(record, sources)
        else:
            targets = torch.zeros(0, len(sample["vision_token_group"]), dtype=torch.float32)
            valid = torch.zeros(0, len(grids), dtype=torch.bool)
        sample["object_targets"] = targets
        sample["object_group_valid"] = valid
        return self.extend_sample(sample, record, clip if kind == "video" else None, supervise)

    keep_frames = False  # whether `extend_sample` needs the decoded frames (`VideoClip.frames`)

    def extend_sample(self, sample: dict, record: Record, clip, supervise: bool) -> dict:
        """Extension point for subclasses that add keys to a finished sample (`swim.seg.data.SegDataset`)."""
        return sample

    def _targets(self, record: Record, sources: list[_Frames]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per object: area fractions [n_obj, K] and group validity [n_obj, G] over the sample's vision tokens
        (a video's temporal groups, or one group per image)."""
        targets, valid = [], []
        for o, obj in enumerate(record.annotation):
            parts, flags = [], []
            for source in sources:
                try:
                    tg, vg = object_group_targets(
                        obj,
                        source.frame_indices,
                        source.original_hw,
                        source.resized_hw,
                        merge_factor=self.settings.factor,
                        temporal_patch=source.temporal_patch,
                        pair_mode=self.pair_mode,
                    )
                except (MaskDecodeError, ValueError) as e:
                    raise record.error(
                        f"annotation[{o}]", f"cannot build mask targets: {e}", "mask_decode"
                    ) from None
                gh, gw = source.grid(self.settings.factor)
                if tg.shape != (source.groups, gh * gw) or vg.shape != (source.groups,):
                    raise record.error(
                        f"annotation[{o}]",
                        f"mask targets {tuple(tg.shape)} / valid {tuple(vg.shape)} do not match the "
                        f"{source.groups} group(s) of {gh}x{gw} tokens",
                        "mask_size",
                    )
                parts.append(torch.as_tensor(np.asarray(tg), dtype=torch.float32).reshape(-1))
                flags.append(torch.as_tensor(np.asarray(vg), dtype=torch.bool))
            targets.append(torch.cat(parts))
            valid.append(torch.cat(flags))
        return torch.stack(targets), torch.stack(valid)

    def _probe(self, record: Record) -> MediaInfo:
        key = record.media_files[1]
        if key not in self._probes:
            if len(self._probes) > 50_000:
                self._probes.clear()
            self._probes[key] = probe_media(record, self.settings)
        return self._probes[key]

    def _load_image(self, record: Record, path: Path, i: int, n: int) -> ImageInput:
        try:
            return load_image(path, self.settings)
        except Exception as e:
            field = "image" if n == 1 else f"image[{i}]"
            raise record.error(field, f"unreadable: {path}: {e}", "unreadable_image") from None


@dataclass(frozen=True)
class _Frames:
    """One video (all its sampled frames) or one image (`frame_indices == [i]`, one group) of a sample."""

    frame_indices: Sequence[int]
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    temporal_patch: int

    @property
    def groups(self) -> int:
        return len(self.frame_indices) // self.temporal_patch

    def grid(self, factor: int) -> tuple[int, int]:
        return self.resized_hw[0] // factor, self.resized_hw[1] // factor


def token_layout(grids: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(group Long [K], (row, column) Long [K, 2]) of the vision tokens of groups with merged grids `grids`
    (each group's tokens row-major, groups in sequence order)."""
    groups = [torch.full((h * w,), g, dtype=torch.long) for g, (h, w) in enumerate(grids)]
    cells = [torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
             for h, w in grids]  # fmt: skip
    if not grids:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long)
    return torch.cat(groups), torch.cat(cells)
