"""Masks from a trained checkpoint: the stock LLM folder plus `seg_head/`, on any frames of a record's video.

    seg = Segmenter.load(ckpt_dir, settings, system_prompt=...)
    dataset = seg.dataset(records)                    # the training's frame sampling and text layout
    logits = seg.logits(dataset.build(records[0]), frames)   # [O, T, m, m] for every object with a query

The LLM reads the record exactly as in training (sampled frames, teacher-forced conversation) and the query
token's last-layer state prompts SAM-2 on **every** frame given (`per_frame`, the training distribution: each frame
decoded independently). For the `swim_attn` prior, a frame that the LLM did not see takes the attention map of the
temporal group of its nearest sampled frame. `propagate` is Sa2VA's inference instead: our masks on key frames
(`first` K frames, as Sa2VA, or `uniform`, as Sa2VA-i) seed a stock `Sam2VideoModel`, which tracks them through the
other frames with its memory — run with the *original* SAM-2 video weights, as Sa2VA-i recommends (the fine-tuned
decoder was never trained on memory-conditioned features).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from swim.modeling.capture import AttentionProbe, vision_token_ids
from swim.modeling.objective import has_queries, supervised_rows
from swim.seg.data import SegCollator, SegDataConfig, SegDataset
from swim.seg.head import SegHead
from swim.seg.objective import attention_gate, make_pairs, swim_attention
from swim.seg.probe import LastHiddenProbe
from swim.seg.sam2 import embedding_size, image_size, mask_size, sam2_frames

logger = logging.getLogger(__name__)

KEY_FRAMES = ("first", "uniform")


def nearest_groups(frame_indices: list[int], sampled_index: list[int], sampled_group: list[int]) -> list[int]:
    """Temporal group of each frame: the group of the sampled frame with the nearest source index."""
    sampled = np.asarray(sampled_index)
    return [int(sampled_group[int(np.abs(sampled - f).argmin())]) for f in frame_indices]


def key_frames(num_frames: int, count: int, mode: str) -> list[int]:
    """Key frames for propagation: the first `count` (Sa2VA) or `count` spread uniformly (Sa2VA-i)."""
    if mode not in KEY_FRAMES:
        raise ValueError(f"key frames must be one of {KEY_FRAMES}, got {mode!r}")
    count = min(count, num_frames)
    if mode == "first":
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, num_frames - 1, count)})


def upsample(logits: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """Low-resolution logits `[..., m, m]` -> boolean masks `[..., H, W]` (bilinear, logit > 0)."""
    lead = logits.shape[:-2]
    up = F.interpolate(logits.reshape(-1, 1, *logits.shape[-2:]).float(), size=hw, mode="bilinear",
                       align_corners=False)  # fmt: skip
    return (up.reshape(*lead, *hw) > 0).cpu().numpy()


class Segmenter:
    def __init__(self, model, head: SegHead, tokenizer, settings, system_prompt: str | None):
        self.model, self.head, self.tokenizer = model.eval(), head.eval(), tokenizer
        self.settings, self.system_prompt = settings, system_prompt
        self.hidden = LastHiddenProbe(model)
        cfg = head.config
        self.prior = cfg.mba_prior if cfg.mba_mode is not None else None
        self.attention = (
            AttentionProbe(model, cfg.prior_layers, checkpoint_recompute=False)
            if self.prior == "swim_attn"
            else None
        )
        self.seg_token_id = (
            tokenizer.convert_tokens_to_ids(cfg.seg_token) if cfg.query == "seg_token" else None
        )

    @classmethod
    def load(
        cls, model_dir: str | Path, settings, system_prompt: str | None, device: str = "cpu"
    ) -> Segmenter:
        from transformers import AutoTokenizer

        from swim.modeling.model import stock_model_class

        model_dir = Path(model_dir)
        if not (model_dir / "seg_head").is_dir():
            raise SystemExit(f"{model_dir}: no seg_head/ folder (trained without the segmentation head?)")
        model = stock_model_class(model_dir).from_pretrained(model_dir).to(device)
        head = SegHead.from_pretrained(model_dir / "seg_head").to(device)
        return cls(model, head, AutoTokenizer.from_pretrained(model_dir), settings, system_prompt)

    def dataset(self, records, **kwargs) -> SegDataset:
        """A `SegDataset` with the head's query mode and SAM-2 geometry (strict: a bad record raises)."""
        from swim.modeling.families import family_of

        cfg, sam = self.head.config, self.head.sam.config
        data = SegDataConfig(image_size=image_size(sam), mask_size=mask_size(sam), query=cfg.query,
                             seg_token=cfg.seg_token, expr_tokens=cfg.mba_expr_tokens)  # fmt: skip
        kwargs = {"supervise_qa": True, "strict": True, **kwargs}
        return SegDataset(records, self.settings, self.tokenizer, seg=data, seg_token_id=self.seg_token_id,
                          system_prompt=self.system_prompt, family=family_of(self.model), **kwargs)  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, sample: dict, frames: np.ndarray, frame_indices: list[int] | None = None,
               chunk: int = 16) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
        """Mask logits `[O', T, m, m]` of the sample's objects that have a query, on `frames` (uint8 `[T, H, W, 3]`,
        source indices `frame_indices`, default 0..T-1), and those objects' indices. The attention prior is read
        from the sample's vision tokens (a video's, or an image's as one group)."""
        if "seg_query" not in sample:
            raise ValueError("the sample has no segmentation targets (no masks or no query token)")
        device = self.device
        batch = SegCollator(self.tokenizer.pad_token_id)([sample])
        seg, grounding = batch.pop("seg"), batch.pop("grounding")
        batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        seg = {k: v.to(device) for k, v in seg.items()}
        rows = None
        if self.attention is not None and has_queries(grounding):
            grounding = {k: v.to(device) for k, v in grounding.items()}
            rows = supervised_rows(grounding, self.head.config.query_offset)
        capture = self.attention.capture(rows) if rows is not None else nullcontext()
        with self.hidden.capture(), capture:
            self.model(**batch, use_cache=False, logits_to_keep=1)
        frame_indices = list(range(len(frames))) if frame_indices is None else list(frame_indices)
        groups = nearest_groups(
            frame_indices, sample["seg_frame_index"].tolist(), sample["seg_frame_group"].tolist()
        )
        n = len(frame_indices)
        seg["frame_index"] = torch.arange(n, device=device)[None]
        seg["frame_group"] = torch.tensor(groups, device=device)[None]
        pairs = make_pairs(seg, all_frames=True)
        query_hidden = self.hidden.rows(
            pairs.query_sample, seg["query"][pairs.query_sample, pairs.query_object]
        )
        expr = seg["expr"][pairs.query_sample, pairs.query_object]
        expr_hidden = self.hidden.rows(pairs.query_sample, expr) if self.head.expr_proj is not None else None
        side = embedding_size(self.head.sam.config)
        gate = None
        if self.prior == "swim_attn":
            gate = torch.ones(pairs.frame.numel(), side, side, device=device)
            if rows is not None:
                attn, token_groups = swim_attention(self.attention, grounding, rows, batch["input_ids"],
                                                    batch["attention_mask"], vision_token_ids(self.model.config))  # fmt: skip
                gate = attention_gate(attn, token_groups, seg["token_grid"], seg["frame_group"], pairs, side)
            self.attention.clear()
        self.hidden.clear()
        pixel_values = sam2_frames(frames, self.head.sam.config.prompt_encoder_config.image_size).to(device)
        out = torch.empty(pairs.frame.numel(), *[4 * side] * 2, device=device)
        for start in range(0, n, chunk):  # frames in chunks: long videos at 1024² stay in memory
            in_chunk = ((pairs.frame >= start) & (pairs.frame < start + chunk)).nonzero().flatten()
            result = self.head(
                pixel_values[start : start + chunk], query_hidden, pairs.frame[in_chunk] - start, pairs.query[in_chunk],
                expr_hidden=expr_hidden, expr_mask=expr >= 0, prior=None if gate is None else gate[in_chunk],
            )  # fmt: skip
            out[in_chunk] = result.logits.float()
        objects = pairs.query_object.tolist()
        logits = out.new_zeros(len(objects), n, *out.shape[-2:])
        logits[pairs.query, pairs.frame] = out
        return logits, objects

    @torch.no_grad()
    def propagate(self, video_model, frames: np.ndarray, key_logits: dict[int, torch.Tensor]) -> torch.Tensor:
        """Sa2VA's video inference for one object: `key_logits` (frame -> our logits `[m, m]`) become mask prompts
        of a stock `Sam2VideoModel`, which tracks the object forward and backward through `frames` (uint8
        `[T, H, W, 3]`). Returns low-resolution logits `[T, m', m']` (our own on the key frames)."""
        from transformers import Sam2VideoInferenceSession

        device = next(video_model.parameters()).device
        size = int(video_model.config.image_size)
        pixel_values = sam2_frames(frames, size).to(device)
        session = Sam2VideoInferenceSession(video=pixel_values, video_height=frames.shape[1],
                                            video_width=frames.shape[2], inference_device=device,
                                            dtype=torch.float32)  # fmt: skip
        obj = session.obj_id_to_idx(1)
        for frame, logits in sorted(key_logits.items()):
            mask = F.interpolate(
                logits[None, None].float(), size=(size, size), mode="bilinear", align_corners=False
            )
            session.add_mask_inputs(obj, frame, (mask > 0).float())
            session.obj_with_new_inputs = [1]
            video_model(session, frame_idx=frame)
        first = min(key_logits)
        tracked: dict[int, torch.Tensor] = {}
        for reverse in (False, True):
            if reverse and first == 0:
                continue
            for output in video_model.propagate_in_video_iterator(
                session, start_frame_idx=first, reverse=reverse
            ):
                tracked[output.frame_idx] = output.pred_masks[0, 0].float()
        side = next(iter(tracked.values())).shape[-1]
        out = torch.stack([tracked[t] for t in range(len(frames))])
        for frame, logits in key_logits.items():
            out[frame] = F.interpolate(logits[None, None].float(), size=(side, side), mode="bilinear",
                                       align_corners=False)[0, 0]  # fmt: skip
        return out


def segment_video(segmenter: Segmenter, video: str | Path, turns, *, all_frames: bool = False, video_model=None,
                  key_mode: str = "first", num_keys: int = 5) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """Masks of every object a conversation refers to (`<ins>`-tagged phrases; `[SEG]` tokens of the answer for a
    `seg_token` head) on the frames the LLM sampled (or on every frame): (frames uint8 `[T, H, W, 3]`,
    {phrase or "[SEG] k": bool `[T, H, W]`}). With `video_model`, masks on key frames are tracked by SAM-2."""
    from swim.data.tags import check_turn_tags, distinct_phrases
    from swim.data.video import probe_video, read_frames
    from swim.seg.data import query_record

    phrases = distinct_phrases(check_turn_tags(turns))
    seg_token = segmenter.head.config.seg_token
    n_seg = sum(t.text.count(seg_token) for t in turns) if segmenter.head.config.query == "seg_token" else 0
    labels = phrases + [f"{seg_token} {k}" for k in range(len(phrases), n_seg)]
    if not labels:
        raise SystemExit(
            "--segment needs <ins>...</ins> around the words to segment (or [SEG] in the answer)"
        )
    dataset = segmenter.dataset([query_record(video, turns, len(labels))])
    sample = dataset.build(dataset.records[0])
    if all_frames:
        indices = list(range(probe_video(video, segmenter.settings).num_frames))
    else:
        indices = sorted(set(sample["seg_frame_index"].tolist()))
    frames = read_frames(video, indices, segmenter.settings)
    logits, objects = segmenter.logits(sample, frames, indices)
    masks = {}
    for row, obj in enumerate(objects):
        per_frame = logits[row]
        if video_model is not None:
            keys = key_frames(len(indices), num_keys, key_mode)
            per_frame = segmenter.propagate(video_model, frames, {k: logits[row, k] for k in keys})
        masks[labels[obj]] = upsample(per_frame, frames.shape[1:3])
    return frames, masks
