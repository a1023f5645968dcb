"""`LastHiddenProbe`: the last decoder layer's hidden states of chosen rows, taken from the model's own forward.

Sa2VA prompts SAM-2 with the last-layer hidden state of the `[SEG]` token. TRL computes the text loss by calling the
backbone with a fused LM head (`swim.trainer.sft`), so no `output_hidden_states` is available; instead a forward hook
on the text model's final norm (`model.language_model.norm` in transformers 5.23: its output is exactly the
`last_hidden_state` that feeds the LM head) keeps that tensor while a `capture()` block is open. The norm runs outside
the checkpointed decoder layers, so the kept tensor carries its gradient under no, non-reentrant or reentrant
activation checkpointing alike, and no module is ever called outside its own forward (ZeRO-3, FSDP2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def final_norm(model: nn.Module) -> nn.Module:
    """The text model's final norm of any supported family (stock, subclassed, PEFT- or DeepSpeed-wrapped)."""
    found = [m for name, m in model.named_modules() if name.endswith("language_model.norm")]
    if len(found) != 1:
        raise ValueError(f"expected one `language_model.norm` in {type(model).__name__}, found {len(found)}")
    return found[0]


class LastHiddenProbe:
    """Keeps the final norm's output `[B, L, d]` of the first forward inside `capture()`.

    Usage::

        probe = LastHiddenProbe(model)
        with probe.capture():
            model(**batch)
        h = probe.rows(batch_index, positions)   # [n, d]
    """

    def __init__(self, model: nn.Module):
        self._hidden: torch.Tensor | None = None
        self._active = False
        self._handle = final_norm(model).register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self._active and self._hidden is None:
            self._hidden = output
        return None

    @contextmanager
    def capture(self) -> Iterator[LastHiddenProbe]:
        self._hidden = None
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    @property
    def hidden(self) -> torch.Tensor:
        if self._hidden is None:
            raise RuntimeError("no hidden states captured: run the model forward inside `probe.capture()`")
        return self._hidden

    def rows(self, batch_index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states at (batch_index[i], positions[...]): Long `[n]` and `[n]` or `[n, k]` -> `[n, (k,) d]`.
        Negative positions (padding) read position 0; callers mask them."""
        hidden = self.hidden
        index = batch_index.to(hidden.device)
        positions = positions.to(hidden.device).clamp(min=0)
        if positions.dim() == 2:
            index = index[:, None].expand_as(positions)
        return hidden[index, positions]

    def clear(self) -> None:
        self._hidden = None

    def remove(self) -> None:
        self._handle.remove()
        self.clear()
