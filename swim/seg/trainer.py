"""`SegPlugin`: what `SwimSFTTrainer` does with the segmentation head when a recipe sets `seg_head: true`.

The trainer calls it at five points and nowhere else (off: none of this exists, see tests/test_seg_train.py):
- construction, before the Trainer wraps the model: the head (`swim.seg.head.SegHead`) becomes the submodule
  `seg_head` of the model, so the optimiser, DDP and DeepSpeed see its weights; a `LastHiddenProbe` hooks the text
  model's final norm; DDP is told `find_unused_parameters=False` (the head runs after DDP's forward, which
  otherwise marks its weights unused and then fails when their gradients arrive), and under ZeRO-3 the three
  decoder weights SAM-2 reads outside their own module are registered with the decoder (`SegHead.external_parameters`);
- `count_step`: the step's supervised (frame, object) pairs and TMC contrasts, over every rank and micro-step;
- `loss`: after TRL's loss (inside the same capture), the head runs on **every** micro-step of every rank — on a
  zero-weighted dummy (one black frame, the first token's hidden state) when the batch has no masks — so every
  rank uses the same weights and issues the same collectives; the loss terms are gathered on every rank for logs;
- `log`: `loss_mask` (BCE), `loss_dice`, `loss_bound` (pair means over the logging window), `loss_tmc` (mean over
  contrasts), `mba_gamma`;
- `save` / `checkpoint_state`: `seg_head/` beside the stock LLM folder, whose state dict loses the `seg_head.*` keys.

Warm-ups (`mba_warmup_ratio`, `aux_warmup_ratio`) are linear in the optimiser step, 0 at step 0.
FSDP with the head is not supported yet (refused): the head runs outside the model's forward, and only the
ZeRO-3 path has been checked for that (tests/test_distributed.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from swim.modeling.capture import supervised_layers
from swim.modeling.objective import GroundingConfig, has_queries
from swim.seg.config import SegConfig
from swim.seg.head import SegHead
from swim.seg.objective import attention_gate, loss_terms, make_pairs, step_counts, swim_attention
from swim.seg.probe import LastHiddenProbe
from swim.seg.sam2 import embedding_size, image_size, mask_size

logger = logging.getLogger(__name__)

SEG_DIR = "seg_head"
LOG_KEYS = ("bce", "dice", "bound", "pairs", "tmc", "tmc_n", "gamma")


def _fresh_log() -> torch.Tensor:
    log = torch.zeros(len(LOG_KEYS))
    log[LOG_KEYS.index("gamma")] = float("nan")
    return log


def is_head_key(key: str) -> bool:
    return key.startswith(f"{SEG_DIR}.") or f".{SEG_DIR}." in key


def build_head(model, cfg: SegConfig, grounding: GroundingConfig, seed: int) -> SegHead:
    """A fresh head for `model` from the recipe: SAM-2 from `seg_sam`, projection and MBA initialised from `seed`
    (in a forked RNG: the same head whatever ran before, and the global RNG stream left as it was)."""
    from transformers import Sam2Model

    sam = Sam2Model.from_pretrained(cfg.seg_sam)
    head_cfg = cfg.head_config(
        llm_hidden=model.config.get_text_config().hidden_size,
        prior_layers=supervised_layers(model, grounding.layers),
        query_offset=grounding.query_offset,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = SegHead(head_cfg, sam)
    head.freeze_encoder(cfg.seg_freeze_encoder)
    return head.to(next(model.parameters()).dtype)


class SegPlugin:
    def __init__(self, model, args, cfg: SegConfig, grounding: GroundingConfig):
        if args.fsdp:
            raise ValueError("seg_head with FSDP is not supported yet: use DDP or DeepSpeed ZeRO-3")
        if args.ddp_find_unused_parameters:
            raise ValueError(
                "seg_head needs ddp_find_unused_parameters=false: the head runs after DDP's forward, and its weights "
                "always receive a gradient (a zero one where the objective does not reach them)"
            )
        args.ddp_find_unused_parameters = False
        self.cfg = cfg
        self.head = build_head(model, cfg, grounding, args.seed)
        model.add_module(SEG_DIR, self.head)
        self.hidden = LastHiddenProbe(model)
        if args.deepspeed:
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            for module, weight in self.head.external_parameters():
                register_external_parameter(module, weight)
        sam_cfg = self.head.sam.config
        self.side, self.mask_side, self.image_side = (
            embedding_size(sam_cfg),
            mask_size(sam_cfg),
            image_size(sam_cfg),
        )
        self._trainable = {n for n, p in self.head.named_parameters() if p.requires_grad}
        self._step = torch.zeros(2)  # global (pairs, TMC contrasts) of the current optimiser step
        self._log = {"train": _fresh_log(), "eval": _fresh_log()}
        trainable = sum(p.numel() for p in self.head.parameters() if p.requires_grad)
        logger.info(
            "segmentation head: SAM-2 from %s (%d px, embedding %d², masks %d²), query %s, MBA %s (prior %s); "
            "%.2f M trainable parameters", cfg.seg_sam, self.image_side, self.side, self.mask_side, cfg.seg_query,
            cfg.mba_mode, cfg.mba_prior, trainable / 1e6,
        )  # fmt: skip

    def after_init(self) -> None:
        """Re-enable the head's trainable weights after TRL's set-up (a PEFT wrap freezes every non-adapter weight)."""
        for name, p in self.head.named_parameters():
            p.requires_grad_(name in self._trainable)

    # ---- per step
    def count_step(self, trainer, batch_samples, device) -> None:
        local = torch.zeros(1, 2, device=device)
        for batch in batch_samples:
            pairs, contrasts = step_counts(batch.get("seg"))
            local[0, 0] += pairs
            local[0, 1] += contrasts
        if trainer.args.world_size > 1:
            local = trainer.accelerator.gather(local)
        self._step = local.sum(0).cpu()

    def _warmup(self, trainer, ratio: float) -> float:
        if not trainer.model.training or ratio <= 0 or not trainer.state.max_steps:
            return 1.0
        return min(1.0, trainer.state.global_step / (ratio * trainer.state.max_steps))

    def _mean_scale(self, trainer, local: float, step_total: float, num_items_in_batch) -> float:
        """Factor turning this micro-batch's sum into its share of the optimiser step's mean (as `_attn_scale`)."""
        if not (trainer.model.training and step_total > 0):
            return 1.0 / max(local, 1.0)
        scale = (trainer.accelerator.num_processes // trainer.get_tp_size()) / step_total
        if not trainer._loss_scaled_for_ga(num_items_in_batch):
            scale = scale * trainer.current_gradient_accumulation_steps
        return scale

    def _dummy(self, device) -> dict:
        s, m = self.image_side, self.mask_side
        one = torch.ones(1, 1, dtype=torch.long, device=device)
        return {"pixel_values": torch.zeros(1, 3, s, s, device=device), "frame_index": one * 0, "frame_group": one * 0,
                "masks": torch.zeros(1, 1, 1, m, m, device=device), "valid": torch.ones(1, 1, 1, dtype=torch.bool, device=device),
                "query": one * 0, "expr": torch.zeros(1, 1, 1, dtype=torch.long, device=device),
                "token_grid": torch.ones(1, 2, dtype=torch.long, device=device)}  # fmt: skip

    def loss(self, trainer, seg: dict | None, inputs: dict, grounding: dict | None, rows, num_items_in_batch):
        """This micro-batch's share of the step's segmentation loss (see `swim.seg.objective`)."""
        cfg = self.cfg
        device = inputs["input_ids"].device
        real = seg is not None and step_counts(seg)[0] > 0
        seg = {k: v.to(device) for k, v in seg.items()} if real else self._dummy(device)
        pairs = make_pairs(seg)
        query_hidden = self.hidden.rows(
            pairs.query_sample, seg["query"][pairs.query_sample, pairs.query_object]
        )
        expr = seg["expr"][pairs.query_sample, pairs.query_object]  # [Q, N]
        expr_hidden = self.hidden.rows(pairs.query_sample, expr) if self.head.expr_proj is not None else None
        gate = None
        if self.head.mba is not None and cfg.mba_prior == "swim_attn":
            gate = torch.ones(pairs.frame.numel(), self.side, self.side, device=device)
            if real and has_queries(grounding):
                attn, groups = swim_attention(trainer.probe, grounding, rows, inputs["input_ids"],
                                              inputs.get("attention_mask"), trainer.vision_token_ids)  # fmt: skip
                gate = attention_gate(attn, groups, seg["token_grid"], seg["frame_group"], pairs, self.side)
        if cfg.tmc_mask == "gt":
            area = seg["masks"][pairs.sample, pairs.obj, pairs.slot]
            pool = F.avg_pool2d(area[:, None], self.mask_side // self.side)[:, 0]
        else:
            pool = "pred"
        out = self.head(seg["pixel_values"], query_hidden, pairs.frame, pairs.query, expr_hidden=expr_hidden,
                        expr_mask=expr >= 0, prior=gate, pool_weights=pool,
                        mba_scale=self._warmup(trainer, cfg.mba_warmup_ratio))  # fmt: skip
        terms = loss_terms(
            out, seg, pairs, cfg.tmc_impl, cfg.tmc_tau, cfg.boundary_norm, cfg.tmc_detach_visual
        )
        n_pairs = float(pairs.frame.numel()) if real else 0.0
        has_tmc = float(real and step_counts(seg)[1] > 0)
        pair_scale = self._mean_scale(trainer, n_pairs, float(self._step[0]), num_items_in_batch)
        tmc_scale = self._mean_scale(trainer, has_tmc, float(self._step[1]), num_items_in_batch)
        aux = self._warmup(trainer, cfg.aux_warmup_ratio)
        total = (cfg.seg_weight * (cfg.bce_weight * terms["bce"] + cfg.dice_weight * terms["dice"]) * pair_scale
                 + aux * (cfg.tmc_weight * terms["tmc"] * tmc_scale + cfg.boundary_weight * terms["bound"] * pair_scale))  # fmt: skip
        if not real:
            total = total * 0.0
        self._gather_log(trainer, terms, n_pairs, has_tmc, out.gamma, real, device)
        return total

    def _gather_log(self, trainer, terms, n_pairs, has_tmc, gamma, real, device) -> None:
        """Gather this micro-step's terms on every rank (same collective whatever the batch held)."""
        local = torch.zeros(1, len(LOG_KEYS), device=device)
        if real:
            local[0, :3] = torch.stack([terms[k].detach().float() for k in ("bce", "dice", "bound")])
            local[0, 3] = n_pairs
            local[0, 4], local[0, 5] = terms["tmc"].detach().float() * has_tmc, has_tmc
        local[0, 6] = float(gamma) if gamma is not None else float("nan")
        total = trainer.accelerator.gather(local)
        mode = "train" if trainer.model.training else "eval"
        summed = total.sum(0).cpu()
        summed[6] = total[:, 6].mean().cpu()
        self._log[mode][:6] += summed[:6]
        self._log[mode][6] = summed[6]

    def flush_log(self, metrics: dict, mode: str) -> None:
        bce, dice, bound, pairs, tmc, tmc_n, gamma = self._log[mode].tolist()
        if pairs > 0:
            metrics["loss_mask"] = [bce / pairs]
            metrics["loss_dice"] = [dice / pairs]
            metrics["loss_bound"] = [bound / pairs]
        if tmc_n > 0:
            metrics["loss_tmc"] = [tmc / tmc_n]
        if gamma == gamma:  # not NaN: the head has MBA
            metrics["mba_gamma"] = [gamma]
        self._log[mode] = _fresh_log()

    # ---- checkpoints
    def save(self, model, output_dir: str, state_dict: dict | None) -> dict:
        """Write `output_dir/seg_head/` from the (full) state dict and return the LLM's part of it."""
        state_dict = state_dict if state_dict is not None else model.state_dict()
        head_state = {k.split(f"{SEG_DIR}.", 1)[1]: v for k, v in state_dict.items() if is_head_key(k)}
        if head_state:
            self.head.save_pretrained(Path(output_dir) / SEG_DIR, head_state)
        return {k: v for k, v in state_dict.items() if not is_head_key(k)}

    def checkpoint_state(self, checkpoint: str) -> dict[str, torch.Tensor]:
        """The head's weights in a checkpoint folder, keyed as in the model's state dict (`seg_head.*`)."""
        saved = SegHead.from_pretrained(Path(checkpoint) / SEG_DIR).state_dict()
        return {f"{SEG_DIR}.{k}": v for k, v in saved.items()}
