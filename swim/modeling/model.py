"""SWIM model classes: a stock Qwen VL class whose forward also takes the grounding targets and returns `loss`,
`loss_text`, `loss_attn`.

No new parameters and no changed modules: `SwimGroundingMixin` adds an `AttentionProbe` (forward hooks inside the
supervised decoder layers' attention) to the family's stock class. `swim_model_class(config)` builds the class
for any supported family (`swim.modeling.families`); it loads stock checkpoints and saves plain ones
(`architectures` names the stock class) that every tool loads with the stock class.
`SwimQwen2_5_VLForConditionalGeneration` is the Qwen2.5-VL one under a fixed name.

Note: TRL's `SFTTrainer` never calls this forward (it calls the backbone with a fused LM head);
`swim.trainer.SwimSFTTrainer` computes the same objective through `compute_loss` with the same code.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from swim.modeling.capture import AttentionProbe, vision_token_ids
from swim.modeling.families import family_of
from swim.modeling.objective import GroundingConfig, grounding_loss, has_queries, supervised_rows


@dataclass
class SwimCausalLMOutput(CausalLMOutputWithPast):
    """`loss = text_weight · loss_text + attn_weight · loss_attn`; `loss_attn` is None without grounding."""

    loss_text: torch.FloatTensor | None = None
    loss_attn: torch.FloatTensor | None = None


class SwimGroundingMixin:
    """Put before a stock Qwen VL class: `forward(grounding=...)` adds the attention loss; saves as the stock class."""

    def __init__(self, config, grounding_config: GroundingConfig | None = None):
        super().__init__(config)
        self.grounding_config = grounding_config or GroundingConfig()
        self._probe: AttentionProbe | None = None

    @property
    def stock_architecture(self) -> str:
        return family_of(self.config).stock_class(self.config).__name__

    def configure_grounding(self, grounding_config: GroundingConfig) -> None:
        """Set the loss settings (and supervised layers) used by `forward(grounding=...)`."""
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        self.grounding_config = grounding_config

    @property
    def probe(self) -> AttentionProbe:
        """Built at the first grounded forward. Adapters applied later (`get_peft_model` on this model) are followed:
        each `capture()` re-hooks q/k modules replaced since, so the attention loss includes the LoRA delta."""
        if self._probe is None:
            self._probe = AttentionProbe(self, self.grounding_config.layers)
        return self._probe

    def forward(self, *args, grounding: dict | None = None, **kwargs) -> SwimCausalLMOutput:
        """Stock forward; with `grounding` (docs/batch_contract.md) and `labels`, the SWIM objective."""
        if not has_queries(grounding):
            outputs = super().forward(*args, **kwargs)
            return SwimCausalLMOutput(**outputs, loss_text=outputs.loss)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("grounding needs input_ids (vision tokens are located by their id)")
        cfg = self.grounding_config
        with self.probe.capture(supervised_rows(grounding, cfg.query_offset)):
            outputs = super().forward(*args, **kwargs)
        try:
            loss_attn, _ = grounding_loss(
                self.probe,
                grounding,
                input_ids,
                kwargs.get("attention_mask"),
                vision_token_ids(self.config),
                cfg,
            )
        finally:
            self.probe.clear()
        loss_text = outputs.loss
        loss = None if loss_text is None else cfg.text_weight * loss_text + cfg.attn_weight * loss_attn
        return SwimCausalLMOutput(**{**outputs, "loss": loss}, loss_text=loss_text, loss_attn=loss_attn)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a plain checkpoint of the stock class (its name in `config.json`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        stock = self.stock_architecture
        config_path = os.path.join(save_directory, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                config = json.load(f)
            config["architectures"] = [stock]
            with open(config_path, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        self.config.architectures = [stock]


def _register_conversion(swim_class: type, stock_class: type) -> None:
    """Checkpoints of some families use a legacy key layout converted on load by a mapping looked up by class
    name; a class defined outside transformers needs it registered (docs/official_release.md §8)."""
    mapping = get_checkpoint_conversion_mapping(stock_class.__name__)
    if mapping is not None:
        register_checkpoint_conversion_mapping(swim_class.__name__, mapping, overwrite=True)


class SwimQwen2_5_VLForConditionalGeneration(SwimGroundingMixin, Qwen2_5_VLForConditionalGeneration):
    pass


_register_conversion(SwimQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)


@functools.cache
def _swim_class(stock_class: type) -> type:
    if stock_class is Qwen2_5_VLForConditionalGeneration:
        return SwimQwen2_5_VLForConditionalGeneration
    cls = type(f"Swim{stock_class.__name__}", (SwimGroundingMixin, stock_class), {"__module__": __name__})
    setattr(sys.modules[__name__], cls.__name__, cls)  # importable by name (pickling, `from ... import`)
    _register_conversion(cls, stock_class)
    return cls


def swim_model_class(config_or_path) -> type:
    """The SWIM class of a checkpoint's family: `swim_model_class(path).from_pretrained(path)`."""
    if isinstance(config_or_path, str | os.PathLike):
        from transformers import AutoConfig

        config_or_path = AutoConfig.from_pretrained(config_or_path)
    return _swim_class(family_of(config_or_path).stock_class(config_or_path))


def stock_model_class(config_or_path) -> type:
    """The stock transformers class of a checkpoint (what evaluation and inference load)."""
    if isinstance(config_or_path, str | os.PathLike):
        from transformers import AutoConfig

        config_or_path = AutoConfig.from_pretrained(config_or_path)
    return family_of(config_or_path).stock_class(config_or_path)


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Freeze the vision tower including the patch merger (every parameter under `visual`). Returns the count."""
    frozen = 0
    for name, param in model.named_parameters():
        if ".visual." in f".{name}" and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
