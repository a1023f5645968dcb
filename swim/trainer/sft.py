"""`SwimSFTTrainer`: TRL's `SFTTrainer` with the SWIM attention-grounding loss added in `compute_loss`.

TRL 1.16 computes the text loss by calling the backbone with a fused LM head, never the model's own forward
(platform notes §7), so the grounding loss cannot live in a model forward. Here an `AttentionProbe` hooks the
supervised decoder layers; `compute_loss` pops the `grounding` targets, runs TRL's own loss inside
`probe.capture()`, and adds `attn_weight · L_attn` computed by the same code as
`SwimQwen2_5_VLForConditionalGeneration.forward`. `loss_text` and `loss_attn` are logged separately.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from trl import SFTTrainer

from swim.modeling.capture import AttentionProbe
from swim.modeling.model import freeze_vision_tower
from swim.modeling.objective import grounding_loss, has_queries
from swim.trainer.config import SwimSFTConfig

logger = logging.getLogger(__name__)


class SwimSFTTrainer(SFTTrainer):
    def __init__(self, model, args: SwimSFTConfig, **kwargs):
        if not isinstance(args, SwimSFTConfig):
            raise TypeError(f"SwimSFTTrainer needs a SwimSFTConfig, got {type(args).__name__}")
        if args.freeze_vision_tower and not isinstance(model, str):
            frozen = freeze_vision_tower(model)
            logger.info("froze the vision tower and merger (%.1f M parameters)", frozen / 1e6)
        super().__init__(model=model, args=args, **kwargs)
        self.grounding = args.grounding_config()
        self.probe = AttentionProbe(self.model, self.grounding.layers)
        self.video_token_id = self.model.config.video_token_id
        logger.info(
            "grounding loss %s on layers %s (fusion %s, λ=%g, text weight %g, query offset %d)",
            self.grounding.loss_type, self.probe.layers, self.grounding.layer_fusion,
            self.grounding.attn_weight, self.grounding.text_weight, self.grounding.query_offset,
        )  # fmt: skip

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        grounding = inputs.pop("grounding", None)
        cfg = self.grounding
        supervised = has_queries(grounding)
        with self.probe.capture() if supervised else nullcontext():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss_text = result[0] if return_outputs else result
        loss, loss_attn = cfg.text_weight * loss_text, None
        if supervised:
            try:
                # λ = 0 still measures the loss (for baselines), without building a graph for it.
                with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.attn_weight != 0):
                    loss_attn, _ = grounding_loss(self.probe, grounding, inputs["input_ids"],
                                                  inputs.get("attention_mask"), self.video_token_id, cfg)  # fmt: skip
            finally:
                self.probe.clear()
            # Like TRL's MoE aux loss: when the Trainer leaves gradient accumulation to a token-normalised text
            # loss, the per-micro-batch mean attention loss is averaged over the accumulation steps here.
            loss_is_scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            steps = self.current_gradient_accumulation_steps if loss_is_scaled_for_ga else 1
            loss = loss + cfg.attn_weight * loss_attn.to(loss.dtype) / steps
        self._log_terms(loss_text, loss_attn)
        return (loss, result[1]) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume the weights through `from_pretrained`, which converts Qwen2.5-VL's checkpoint key layout.

        transformers' Trainer loads a checkpoint's raw keys with `strict=False`; Qwen2.5-VL saves the legacy
        layout (`model.layers.*`, `visual.*`) that only `from_pretrained` maps back, so a plain resume would load
        nothing and silently continue from the *initial* weights (caught by tests/test_train_entry.py). DeepSpeed,
        FSDP and PEFT checkpoints keep their own loaders.
        """
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        param = next(model.parameters())
        saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(resume_from_checkpoint, dtype=param.dtype)
        model.load_state_dict(saved.state_dict(), strict=True)
        logger.info("resumed the weights of %s", resume_from_checkpoint)

    def _log_terms(self, loss_text: torch.Tensor, loss_attn: torch.Tensor | None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        metrics["loss_text"].append(self.accelerator.gather_for_metrics(loss_text.detach()).mean().item())
        if loss_attn is not None:
            metrics["loss_attn"].append(self.accelerator.gather_for_metrics(loss_attn.detach()).mean().item())
