"""`SwimSFTTrainer`: TRL's `SFTTrainer` with the SWIM attention-grounding loss added in `compute_loss`.

TRL 1.16 computes the text loss by calling the backbone with a fused LM head, never the model's own forward
(docs/official_release.md §8), so the grounding loss cannot live in a model forward. Here an `AttentionProbe` hooks
the supervised layers' attention; `compute_loss` pops the `grounding` targets, runs TRL's own loss inside
`probe.capture(rows)`, and adds `attn_weight · L_attn` computed by the same code as the SWIM model classes'
forward (`swim.modeling.model`). Any supported family (`swim.modeling.families`) trains the same way.

Distributed training (DDP, DeepSpeed ZeRO-3, FSDP2) with batches that mix samples with and without masks:
- the capture touches no parameter outside its module's forward, so a rank without masks issues exactly the
  collectives a supervised rank does (see `swim/modeling/capture.py`);
- every rank gathers the logged terms on every micro-step, supervised or not;
- `L_attn` of an optimiser step is the mean over all supervised (row, temporal group) pairs of the global batch
  (every rank, every accumulation micro-step), the way TRL normalises the token loss with `num_items_in_batch`:
  the pair count is all-reduced once per step in `get_batch_samples`, each micro-step contributes its pair *sum*
  divided by that count. So λ does not depend on how a global batch is split over ranks and micro-steps.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from trl import SFTTrainer

from swim.checkpoint import RunProcessor, check_stock_layout, drop_tied_aliases, stock_layout
from swim.modeling.capture import AttentionProbe, vision_token_ids
from swim.modeling.model import freeze_vision_tower, stock_model_class
from swim.modeling.objective import grounding_loss, has_queries, supervised_pair_count, supervised_rows
from swim.seg.config import SegConfig
from swim.seg.trainer import SegPlugin
from swim.trainer.config import SwimSFTConfig

logger = logging.getLogger(__name__)


class SwimSFTTrainer(SFTTrainer):
    """`seg`: the optional segmentation head's settings (`swim.seg`); with `seg_head: true` the head is added as a
    plug-in (`swim.seg.trainer.SegPlugin`), otherwise nothing of it exists. `processor`: the run's processor
    (`swim.checkpoint.RunProcessor`), written into every folder the trainer saves, so that each `checkpoint-N` and
    the final folder load with `AutoProcessor` as well as with the stock model class."""

    def __init__(
        self, model, args: SwimSFTConfig, seg: SegConfig | None = None, processor: RunProcessor | None = None,
        **kwargs,
    ):  # fmt: skip
        if not isinstance(args, SwimSFTConfig):
            raise TypeError(f"SwimSFTTrainer needs a SwimSFTConfig, got {type(args).__name__}")
        if args.freeze_vision_tower and not isinstance(model, str):
            frozen = freeze_vision_tower(model)
            logger.info("froze the vision tower and merger (%.1f M parameters)", frozen / 1e6)
        seg_plugin = SegPlugin(model, args, seg, args.grounding_config()) if seg and seg.seg_head else None
        super().__init__(model=model, args=args, **kwargs)
        self.seg = seg_plugin
        self.processor = processor
        if self.seg is not None:
            self.seg.after_init()
        # Qwen2.5-VL declares `accepts_loss_kwargs = False` (its own loss ignores `num_items_in_batch`), which makes
        # the Trainer average per-micro-batch token means: the text loss would then depend on how a global batch
        # is split over ranks and accumulation steps. TRL computes the loss itself (fused LM head) and does honour
        # `num_items_in_batch`, so ask the Trainer to count the step's tokens over all ranks and micro-batches.
        self.model_accepts_loss_kwargs = True
        self.grounding = args.grounding_config()
        # Registered before DeepSpeed/FSDP wrap the model (at `train()`), so the hooks see the raw q/k outputs.
        self.probe = AttentionProbe(self.model, self.grounding.layers)
        self.vision_token_ids = vision_token_ids(self.model.config)
        self._step_attn_pairs: torch.Tensor | None = None  # global supervised pairs of the current step
        self._attn_log = {"train": [0.0, 0.0], "eval": [0.0, 0.0]}  # [loss sum, pairs] since the last log
        g = self.grounding
        logger.info(
            "grounding loss %s on layers %s (layer fusion %s, head fusion %s, target %s%s, λ=%g, text weight %g, "
            "query offset %d)", g.loss_type, self.probe.layers, g.layer_fusion, g.head_fusion, g.target,
            f" ring {g.target_ring} masses {list(g.target_masses)}" if g.target == "klal" else "", g.attn_weight,
            g.text_weight, g.query_offset,
        )  # fmt: skip

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count the supervised (row, group) pairs of the whole step, over all ranks (every rank gathers)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        offset = self.grounding.query_offset
        local = sum(supervised_pair_count(batch.get("grounding"), offset) for batch in batch_samples)
        count = torch.tensor([float(local)], device=device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count)
        self._step_attn_pairs = count.sum()
        if self.seg is not None:
            self.seg.count_step(self, batch_samples, device)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        grounding = inputs.pop("grounding", None)
        seg = inputs.pop("seg", None)
        cfg = self.grounding
        supervised = has_queries(grounding)
        rows = supervised_rows(grounding, cfg.query_offset) if supervised else None
        with self.probe.capture(rows) if supervised else nullcontext(), self._seg_capture():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss_text = result[0] if return_outputs else result
        loss, attn_sum, attn_pairs = cfg.text_weight * loss_text, None, 0.0
        try:
            if supervised:
                # λ = 0 still measures the loss (for baselines), without building a graph for it.
                with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.attn_weight != 0):
                    loss_attn, stats = grounding_loss(self.probe, grounding, inputs["input_ids"],
                                                      inputs.get("attention_mask"), self.vision_token_ids, cfg)  # fmt: skip
            if self.seg is not None:  # every rank, every micro-step (a zero-weighted dummy without masks)
                loss = loss + self.seg.loss(self, seg, inputs, grounding, rows, num_items_in_batch).to(
                    loss.dtype
                )
        finally:
            self.probe.clear()
            if self.seg is not None:
                self.seg.hidden.clear()
        if supervised:
            attn_pairs = stats["attn_pairs"]
            attn_sum = loss_attn * attn_pairs
            if cfg.attn_weight != 0 and attn_pairs > 0:
                share = attn_sum * self._attn_scale(attn_pairs, num_items_in_batch)
                loss = loss + cfg.attn_weight * share.to(loss.dtype)
        self._log_terms(loss_text, attn_sum, attn_pairs, num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss

    def _seg_capture(self):
        return self.seg.hidden.capture() if self.seg is not None else nullcontext()

    def _attn_scale(self, local_pairs: float, num_items_in_batch) -> float | torch.Tensor:
        """Factor turning this micro-batch's pair sum into its share of the step's global pair mean.

        Training: 1 / (global pairs of the step), times the data-parallel size (DDP, ZeRO and FSDP average
        gradients over ranks), times the accumulation steps when the Trainer divides the loss by them. Anywhere
        else (evaluation, a direct call): the micro-batch's own mean.
        """
        if not (self.model.training and self._step_attn_pairs is not None and self._step_attn_pairs > 0):
            return 1.0 / local_pairs
        scale = (self.accelerator.num_processes // self.get_tp_size()) / self._step_attn_pairs
        if not self._loss_scaled_for_ga(num_items_in_batch):
            scale = scale * self.current_gradient_accumulation_steps
        return scale

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror of `Trainer.training_step`: does the Trainer leave gradient accumulation to the loss?"""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        token_normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        return token_normalised or self.compute_loss_func is not None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume the weights through `from_pretrained`, which converts the checkpoint key layout.

        transformers' Trainer loads a checkpoint's raw keys with `strict=False`; Qwen2/2.5-VL save a legacy
        layout (`model.layers.*`, `visual.*`) that only `from_pretrained` maps back, so a plain resume would load
        nothing and silently continue from the *initial* weights (caught by tests/test_train_entry.py). DeepSpeed,
        FSDP and PEFT checkpoints keep their own loaders.
        """
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        param = next(model.parameters())
        saved = stock_model_class(model.config).from_pretrained(resume_from_checkpoint, dtype=param.dtype)
        state = saved.state_dict()
        if self.seg is not None:  # the head is saved beside the LLM (seg_head/)
            state |= self.seg.checkpoint_state(resume_from_checkpoint)
        model.load_state_dict(state, strict=True)
        logger.info("resumed the weights of %s", resume_from_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A stock checkpoint folder: the weights under the stock class's tensor names (whatever the back-end), the
        processor beside them, and with the segmentation head `seg_head/` (the LLM's state dict loses `seg_head.*`).
        Runs for the final save and every `checkpoint-N` (`swim.checkpoint`)."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        adapter = hasattr(model, "peft_config")  # PEFT's own folder format (`swim merge-lora` makes it stock)
        if self.seg is not None and self.args.should_save:
            state_dict = self.seg.save(self.model, output_dir, state_dict)
        if state_dict and not adapter:
            state_dict = drop_tied_aliases(model, state_dict)
        with nullcontext() if adapter else stock_layout(model):
            super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        if self.processor is not None:
            self.processor.save(output_dir)
        # ZeRO-3 with stage3_gather_16bit_weights_on_model_save off passes an empty state dict
        if state_dict is not None and not state_dict:
            logger.warning("%s holds DeepSpeed shards only, no stock weights (zero_to_fp32.py)", output_dir)
        elif not adapter:
            check_stock_layout(output_dir, model.config)

    def _log_terms(self, loss_text: torch.Tensor, attn_sum: torch.Tensor | None, attn_pairs: float,
                   num_items_in_batch) -> None:  # fmt: skip
        """Gather the loss terms of this micro-step on every rank, whatever its batch holds (same collectives).

        `loss_text`: the micro-step's share of the step's token mean (TRL scales it by the data-parallel size and
        normalises by the step's tokens), times the number of micro-steps, so that the logged average over a
        logging window is the step's token mean. `loss_attn`: the pair-weighted mean over every supervised pair
        of the logging window, all ranks (absent when there was none).
        """
        mode = "train" if self.model.training else "eval"
        text = self.accelerator.gather(loss_text.detach().float()[None]).mean()
        if num_items_in_batch is not None and mode == "train":
            text = text * self.current_gradient_accumulation_steps
        self._metrics[mode]["loss_text"].append(text.item())
        local = torch.zeros(1, 2, device=loss_text.device)
        if attn_sum is not None:
            local[0, 0], local[0, 1] = attn_sum.detach().float(), attn_pairs
        total = self.accelerator.gather(local).sum(0)
        self._attn_log[mode][0] += total[0].item()
        self._attn_log[mode][1] += total[1].item()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        loss_sum, pairs = self._attn_log[mode]
        if pairs > 0:
            self._metrics[mode]["loss_attn"] = [loss_sum / pairs]
        self._attn_log[mode] = [0.0, 0.0]
        if self.seg is not None:
            self.seg.flush_log(self._metrics[mode], mode)
        super().log(logs, start_time)
