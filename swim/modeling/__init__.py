"""Attention capture, grounding losses and model families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) on stock
transformers (our "patched model" without a patch).

The names below are imported on first use (PEP 562), so that the data tools, which need only
`swim.modeling.families`, do not import torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AttentionProbe": "swim.modeling.capture",
    "attention_maps": "swim.modeling.capture",
    "default_supervised_layers": "swim.modeling.capture",
    "supervised_layers": "swim.modeling.capture",
    "FAMILIES": "swim.modeling.families",
    "FamilySpec": "swim.modeling.families",
    "family_of": "swim.modeling.families",
    "GroundingConfig": "swim.modeling.objective",
    "grounding_loss": "swim.modeling.objective",
    "supervised_pair_count": "swim.modeling.objective",
    "supervised_rows": "swim.modeling.objective",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'swim.modeling' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
