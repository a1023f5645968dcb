"""Attention capture for chosen decoder layers and query rows, on stock transformers.

Design: *recompute from captured layer inputs* (reference §8.1), not a registered attention function.

- A forward pre-hook on each supervised decoder layer keeps a reference to the layer's input hidden states and
  its rotary `(cos, sin)`. In transformers 5 the gradient-checkpointing wrapper checkpoints `forward`, not
  `__call__`, so module hooks run *outside* the checkpointed region: the captured tensors are ordinary graph
  tensors under no checkpointing, reentrant and non-reentrant checkpointing alike (and they are saved anyway as
  checkpoint inputs, so keeping them costs no memory).
- After the forward, `input_layernorm → q_proj` (selected rows only) and `k_proj` (all keys) are recomputed
  for the supervised layers only, M-RoPE is applied with the captured `(cos, sin)`, and the probabilities are
  a float32 causal + padding softmax. When the model checkpoints its layers, the recompute runs under a
  non-reentrant checkpoint too, so only the small `[rows, K]` result is kept for backward; otherwise, like the
  model, it keeps its activations and skips the second pass.

Why not an `AttentionInterface` function that records rows during the real forward: under reentrant
checkpointing that forward runs without autograd, so the recorded rows carry no gradient (exactly the bug of
the official release), and the recomputation in backward would record them twice. The recompute is also
independent of the kernel that runs the main attention (sdpa, eager, flash_attention_2), leaves the main
forward untouched, and never touches the vision tower (whose blocks have no `self_attn`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# The official layers for the 28-layer Qwen2.5-VL-7B LLM.
REFERENCE_LAYERS = (2, 7, 12, 17, 22, 27)
REFERENCE_DEPTH = 28


def default_supervised_layers(num_layers: int) -> list[int]:
    """Supervised decoder layers for a model of `num_layers` layers.

    Rule: keep the official layers' *relative depths*: layer `round(l * (n - 1) / 27)` for
    l in (2, 7, 12, 17, 22, 27), de-duplicated. For 28 layers this is exactly [2, 7, 12, 17, 22, 27]; for 36
    (Qwen2.5-VL-3B) [3, 9, 16, 22, 29, 35]; for 8 [1, 2, 3, 4, 6, 7]; for 4 [0, 1, 2, 3].
    """
    scale = (num_layers - 1) / (REFERENCE_DEPTH - 1)
    return sorted({round(layer * scale) for layer in REFERENCE_LAYERS})


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The text decoder layers of `model` (stock, subclassed, PEFT- or DeepSpeed-wrapped), by `layer_idx`.

    A decoder layer is a module with `self_attn.layer_idx` and an `input_layernorm`; vision blocks have
    neither, so the vision tower is never hooked.
    """
    layers = {}
    for module in model.modules():
        attn = getattr(module, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx") and hasattr(module, "input_layernorm"):
            layers[attn.layer_idx] = module
    if not layers:
        raise ValueError(f"no text decoder layers found in {type(model).__name__}")
    return [layers[i] for i in sorted(layers)]


def video_token_positions(input_ids: torch.Tensor, video_token_id: int) -> torch.Tensor:
    """Positions of the video tokens of each sample, in sequence order.

    input_ids: Long `[B, L]` -> Long `[B, K]`, K = the largest count in the batch, padded with -1.
    """
    is_video = input_ids == video_token_id
    counts = is_video.sum(-1)
    k = int(counts.max()) if counts.numel() else 0
    positions = torch.full((input_ids.shape[0], k), -1, dtype=torch.long, device=input_ids.device)
    rows, cols = is_video.nonzero(as_tuple=True)
    # rank of each video token within its row
    rank = torch.arange(rows.numel(), device=input_ids.device) - (counts.cumsum(0) - counts)[rows]
    positions[rows, rank] = cols
    return positions


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, heads, n, d]`, cos/sin `[B, n, d]` (Qwen2.5-VL's recomposed M-RoPE tables)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def attention_rows(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_positions: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Float32 attention probabilities of the selected query rows of one decoder layer.

    hidden_states: `[B, L, D]` the layer's input; cos, sin: `[B, L, d]`; query_positions: Long `[B, n]`
    (valid, >= 0); key_mask: Bool `[B, L]` (False at padding). Returns `[B, heads, n, L]`: each row is a causal
    softmax over keys `<=` its position that are not padding, and sums to 1.
    """
    attn = layer.self_attn
    full_length = hidden_states.shape[1]
    # causal: keys after the last selected row get probability 0, so they are never projected
    length = int(query_positions.max()) + 1 if query_positions.numel() else 1
    hidden_states, cos, sin, key_mask = (t[:, :length] for t in (hidden_states, cos, sin, key_mask))
    b = hidden_states.shape[0]
    n, d = query_positions.shape[1], attn.head_dim
    x = layer.input_layernorm(hidden_states)
    x_rows = x.gather(1, query_positions[..., None].expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(x_rows).view(b, n, -1, d).transpose(1, 2)  # [B, H, n, d]
    k = attn.k_proj(x).view(b, length, -1, d).transpose(1, 2)  # [B, KV, L, d]
    rows_cos = cos.gather(1, query_positions[..., None].expand(-1, -1, d))
    rows_sin = sin.gather(1, query_positions[..., None].expand(-1, -1, d))
    q = _rope(q, rows_cos, rows_sin).float()
    k = _rope(k, cos, sin).float()
    # GQA without materialising repeated keys: group the query heads of each key/value head.
    kv_heads = k.shape[1]
    q = q.reshape(b, kv_heads, -1, d)  # [B, KV, (H/KV)*n, d]; head h = kv * (H/KV) + r, as repeat_kv
    scores = torch.matmul(q, k.transpose(-1, -2)).view(b, -1, n, length) * attn.scaling
    keys = torch.arange(length, device=hidden_states.device)
    allowed = (keys <= query_positions[..., None]) & key_mask[:, None, :]
    allowed |= keys == query_positions[..., None]  # a row always sees itself (the model does too)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs if length == full_length else torch.nn.functional.pad(probs, (0, full_length - length))


class AttentionProbe:
    """Hooks the supervised decoder layers of a Qwen2.5-VL model and recomputes attention rows on demand.

    Usage::

        probe = AttentionProbe(model, layers=[2, 7, 12, 17, 22, 27])
        with probe.capture():
            outputs = model(**batch)          # any caller: the model's forward, TRL's fused backbone call, ...
        rows = probe.rows(query_positions, batch["attention_mask"])   # [layers, B, heads, n, L]

    Outside `capture()` the hooks do nothing, so inference and mask-less batches pay nothing.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[int] | None = None, checkpoint_recompute: bool = True
    ):
        decoder_layers = find_decoder_layers(model)
        self.layers = list(layers) if layers is not None else default_supervised_layers(len(decoder_layers))
        bad = [i for i in self.layers if not 0 <= i < len(decoder_layers)]
        if bad:
            raise ValueError(f"supervised layers {bad} out of range for a {len(decoder_layers)}-layer model")
        self.checkpoint_recompute = checkpoint_recompute
        self._modules = [decoder_layers[i] for i in self.layers]
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._active = False
        self._handles = [
            module.register_forward_pre_hook(self._make_hook(slot), with_kwargs=True)
            for slot, module in enumerate(self._modules)
        ]

    def _make_hook(self, slot: int):
        def hook(module, args, kwargs):
            if not self._active:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            self._captured[slot] = (hidden, cos, sin)
            return None

        return hook

    @contextmanager
    def capture(self) -> Iterator[AttentionProbe]:
        """Record the supervised layers' inputs during the forward passes run inside this block."""
        self._captured.clear()
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def clear(self) -> None:
        """Drop the captured tensors (they hold part of the graph)."""
        self._captured.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def _captured_inputs(self, batch_index: torch.Tensor | None):
        if len(self._captured) != len(self._modules):
            raise RuntimeError(
                "no captured layer inputs: run the model forward inside `probe.capture()` first "
                f"(captured {sorted(self._captured)} of slots 0..{len(self._modules) - 1})"
            )
        for slot, module in enumerate(self._modules):
            hidden, cos, sin = self._captured[slot]
            if batch_index is not None and batch_index.numel() < hidden.shape[0]:
                hidden, cos, sin = hidden[batch_index], cos[batch_index], sin[batch_index]
            yield module, hidden, cos, sin

    def rows(
        self,
        query_positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention probabilities of the given rows over all keys: `[layers, B, heads, n, L]` (float32).

        query_positions: Long `[B, n]`, valid positions; attention_mask: `[B, L]` 2-D padding mask (1 = token) or
        None; batch_index: optional Long `[B']` to compute for a subset of the captured batch (query_positions
        and attention_mask then refer to that subset).
        """
        out = []
        for module, hidden, cos, sin in self._captured_inputs(batch_index):
            key_mask = _key_mask(attention_mask, hidden)
            out.append(attention_rows(module, hidden, cos, sin, query_positions, key_mask))
        return torch.stack(out)

    def video_attention(
        self,
        query_positions: torch.Tensor,
        video_positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head-mean attention of the given rows on the video tokens: `[layers, B, n, K]` (float32).

        query_positions: Long `[B, n]` (padding -1: those rows come back as zeros); video_positions: Long
        `[B, K]` (padding -1: those columns come back as zeros). When the model uses activation checkpointing,
        the recompute is wrapped in a non-reentrant checkpoint too, so only the `[B, n, K]` results are kept
        for backward.
        """
        q_valid = query_positions >= 0
        k_valid = video_positions >= 0
        q_pos = query_positions.clamp(min=0)
        v_pos = video_positions.clamp(min=0)

        def per_layer(module, hidden, cos, sin):
            key_mask = _key_mask(attention_mask, hidden)
            probs = attention_rows(module, hidden, cos, sin, q_pos, key_mask).mean(1)  # [B, n, L]
            video = probs.gather(2, v_pos[:, None, :].expand(-1, probs.shape[1], -1))
            return video * (q_valid[:, :, None] & k_valid[:, None, :])

        out = []
        for module, hidden, cos, sin in self._captured_inputs(batch_index):
            # Follow the model: when its layers trade compute for memory, so does the recompute.
            trade_memory = self.checkpoint_recompute and getattr(module, "gradient_checkpointing", False)
            if trade_memory and torch.is_grad_enabled() and hidden.requires_grad:
                out.append(checkpoint(per_layer, module, hidden, cos, sin, use_reentrant=False))
            else:
                out.append(per_layer(module, hidden, cos, sin))
        return torch.stack(out)


def _key_mask(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2-D padding mask [B, L], got shape {tuple(attention_mask.shape)}")
    return attention_mask.to(device=hidden.device, dtype=torch.bool)


def attention_maps(
    model: nn.Module,
    inputs: dict,
    layers: Sequence[int],
    query_positions: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of chosen decoder layers and query rows over all keys.

    model: a (stock) Qwen2.5-VL model; inputs: its forward inputs (`input_ids`, `attention_mask`,
    `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`, `mm_token_type_ids`, ...); layers: decoder
    layer indices; query_positions: Long `[B, n]`. Returns float32 `[len(layers), B, heads, n, seq_len]`, rows
    summing to 1 (causal + padding mask), equal to the `output_attentions=True` weights of an eager model.
    Runs under the caller's grad mode; temporary hooks are removed afterwards.
    """
    probe = AttentionProbe(model, layers, checkpoint_recompute=False)
    try:
        with probe.capture():
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=1)
        return probe.rows(query_positions, inputs.get("attention_mask"))
    finally:
        probe.remove()
