"""Attention capture and grounding losses for Qwen2.5-VL on stock transformers (our "patched model")."""

from swim.modeling.capture import AttentionProbe, attention_maps, default_supervised_layers
from swim.modeling.objective import GroundingConfig, grounding_loss, supervised_pair_count, supervised_rows

__all__ = [
    "AttentionProbe",
    "GroundingConfig",
    "attention_maps",
    "default_supervised_layers",
    "grounding_loss",
    "supervised_pair_count",
    "supervised_rows",
]
