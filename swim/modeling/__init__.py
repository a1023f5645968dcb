"""Attention capture, grounding losses and model families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) on stock
transformers (our "patched model" without a patch)."""

from swim.modeling.capture import AttentionProbe, attention_maps, default_supervised_layers, supervised_layers
from swim.modeling.families import FAMILIES, FamilySpec, family_of
from swim.modeling.objective import GroundingConfig, grounding_loss, supervised_pair_count, supervised_rows

__all__ = [
    "FAMILIES",
    "AttentionProbe",
    "FamilySpec",
    "GroundingConfig",
    "attention_maps",
    "default_supervised_layers",
    "family_of",
    "grounding_loss",
    "supervised_layers",
    "supervised_pair_count",
    "supervised_rows",
]
