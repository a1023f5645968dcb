"""Attention capture for chosen decoder layers and query rows, taken from the model's own forward.

Design: *capture q and k inside the forward, finish the softmax outside it* (docs/batch_contract.md, README).

- A forward pre-hook on each supervised layer's attention module (`self_attn`) keeps references to its rotary
  tables `(cos, sin)`.
- Forward hooks on the modules that produce the **pre-RoPE query and key states** keep their outputs: the per-head
  norms `q_norm` / `k_norm` where the family has them (Qwen3-VL, Qwen3.5, whose gated `q_proj` also emits the
  output gate), otherwise `q_proj` / `k_proj` (Qwen2-VL, Qwen2.5-VL); `swim.modeling.families` says which.
  The query hook keeps only the rows to be supervised (`capture(query_positions=...)`: the collator knows them
  before the forward) of the samples that have any; the key hook keeps keys up to the last such row (later keys
  are causally masked anyway).
- After the forward only parameter-free work is left: RoPE with the captured tables (partial rotary where the
  tables are narrower than a head), a float32 GQA score, the causal + padding (+ sliding-window) softmax, the
  gather of the visual columns. Under activation checkpointing that part runs under
  its own non-reentrant checkpoint, so only the small `[B, n, K]` result is kept for backward.

Why this design: no module with parameters is ever called outside its own forward. Under DeepSpeed ZeRO-3 a
module's partitioned weights are gathered by collectives in its own forward/backward hooks, and under FSDP2 they
are resharded `DTensor`s after the layer's forward, so a post-forward recompute (the previous design) issued
extra collectives on supervised ranks only (a hang or a gloo abort on mixed batches) and could not run under FSDP2
at all. Here the attention loss reaches `q_proj` / `k_proj` only through activations of the main graph: its
gradient flows through the same backward nodes the text loss uses, so there is no extra collective anywhere and
ranks with and without masks stay in lockstep. It is also cheaper: the second `input_layernorm`, `q_proj` and
`k_proj` pass is gone. The result is independent of the kernel of the main attention (sdpa, eager,
flash_attention_2), the vision tower is never hooked (its blocks have no `self_attn.layer_idx`), and nothing is
captured outside `capture()` (inference, batches without masks).

Checkpointing: none or non-reentrant only. Under reentrant checkpointing the layer's forward runs without
autograd, so captured q/k would carry no gradient: the probe raises, and `SwimSFTConfig` rejects the setting when
the config is parsed. Memory: the keys of the supervised layers up to the last supervised row stay alive until the
loss is computed (6 layers x 16k tokens x 512 x bf16 ~ 100 MB for Qwen2.5-VL-7B), in storage of their own: a slice
view would keep each layer's whole L-long key tensor alive. The rotary tables stay views: every layer receives the
same `(cos, sin)`, so views share one pair of tensors, where copies would cost one pair per supervised layer.

torch.compile (with or without activation checkpointing): the hooks are `torch.compiler.disable`d, so they always
run eagerly (in a checkpointed layer Dynamo then runs that layer's checkpoint eagerly; the other layers stay
compiled), and building a probe turns Dynamo's guards on module hooks on
(`torch._dynamo.config.skip_nnmodule_hook_guards = False`): by default Dynamo does not guard on *empty* hook dicts,
so code compiled for an unsupervised decoder layer (no hooks) was reused for the supervised ones, whose hooks then
never ran. Code compiled before the probe existed has no such guard: build the probe before the first compiled
forward (`SwimSFTTrainer` does), or call `torch._dynamo.reset()` after building it.

Adapters: the probe follows module replacement. At each `capture()` it re-hooks any supervised layer whose attention
or q/k module was replaced since it was hooked: PEFT's `get_peft_model` replaces `q_proj` by a LoRA layer whose
`base_layer` is the hooked Linear, whose hook would see `W·x` without the adapter's delta. A probe built before the
adapters were applied therefore gives the rows of one built after them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from swim.modeling.families import FamilySpec, family_of
from swim.modeling.losses import HEAD_FUSIONS, fuse_heads

logger = logging.getLogger(__name__)

# The official layers for the 28-layer Qwen2.5-VL-7B LLM.
REFERENCE_LAYERS = (2, 7, 12, 17, 22, 27)
REFERENCE_DEPTH = 28
ALL_LAYERS = "all"  # every softmax-attention decoder layer


def default_supervised_layers(num_layers: int) -> list[int]:
    """Supervised decoder layers for a model of `num_layers` layers.

    Rule: keep the official layers' *relative depths*: layer `round(l * (n - 1) / 27)` for
    l in (2, 7, 12, 17, 22, 27), de-duplicated. For 28 layers this is exactly [2, 7, 12, 17, 22, 27]; for 36
    (Qwen2.5-VL-3B) [3, 9, 16, 22, 29, 35]; for 8 [1, 2, 3, 4, 6, 7]; for 4 [0, 1, 2, 3].
    """
    scale = (num_layers - 1) / (REFERENCE_DEPTH - 1)
    return sorted({round(layer * scale) for layer in REFERENCE_LAYERS})


def find_decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The softmax-attention text decoder layers of `model` (stock, subclassed, PEFT-, DeepSpeed- or FSDP-wrapped),
    keyed by the model's own layer index.

    A decoder layer is a module with `self_attn.layer_idx` and an `input_layernorm`; vision blocks have neither,
    so the vision tower is never hooked, and the linear-attention layers of a hybrid model (Qwen3.5) have no
    `self_attn`, so only its softmax-attention layers are returned.
    """
    layers = {}
    for module in model.modules():
        attn = getattr(module, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx") and hasattr(module, "input_layernorm"):
            layers[attn.layer_idx] = module
    if not layers:
        raise ValueError(f"no text decoder layers found in {type(model).__name__}")
    return dict(sorted(layers.items()))


def parse_layers(values: list[str] | None) -> list[int] | str | None:
    """`--layers 1 3` or `--layers all` (None: the default rule)."""
    if values is None:
        return None
    return ALL_LAYERS if values == [ALL_LAYERS] else [int(v) for v in values]


def supervised_layers(model: nn.Module, layers: Sequence[int] | str | None = None) -> list[int]:
    """The layer indices to supervise: `layers` checked against the model, `"all"`, or the default rule.

    Default: the official relative depths (`default_supervised_layers`) over the softmax-attention layers; for a
    hybrid model, over those layers only (then mapped back to the model's own indices). `"all"`: every
    softmax-attention decoder layer (KLAL supervises all layers).
    """
    attention_layers = list(find_decoder_layers(model))
    if layers is None:
        return [attention_layers[i] for i in default_supervised_layers(len(attention_layers))]
    if isinstance(layers, str):
        if layers != ALL_LAYERS:
            raise ValueError(f"supervised layers must be a list of indices or {ALL_LAYERS!r}, got {layers!r}")
        return attention_layers
    repeated = duplicate_indices(layers)
    if repeated:
        raise ValueError(
            f"supervised layers {list(layers)} list {repeated} more than once (that layer would be weighted twice): "
            "list each layer index once"
        )
    bad = [i for i in layers if i not in attention_layers]
    if bad:
        raise ValueError(
            f"supervised layers {bad} are not softmax-attention decoder layers of this model "
            f"(those are {_ranges(attention_layers)})"
        )
    return list(layers)


def duplicate_indices(indices: Sequence[int]) -> list[int]:
    """The indices listed more than once, sorted: `[2, 7, 2, 2]` -> `[2]`."""
    return sorted(i for i, n in Counter(indices).items() if n > 1)


def _ranges(indices: Sequence[int]) -> str:
    contiguous = list(indices) == list(range(indices[0], indices[-1] + 1))
    return f"{indices[0]}..{indices[-1]}" if contiguous and len(indices) > 3 else str(list(indices))


def vision_token_ids(config) -> tuple[int, int]:
    """The token ids whose positions are the vision tokens of a model: `(image_token_id, video_token_id)`."""
    return int(config.image_token_id), int(config.video_token_id)


def vision_token_positions(input_ids: torch.Tensor, token_ids: int | Sequence[int]) -> torch.Tensor:
    """Positions of the vision tokens (image and video tokens, as given by `token_ids`) of each sample, in
    sequence order: the columns the attention loss and the metrics read (docs/batch_contract.md).

    input_ids: Long `[B, L]` -> Long `[B, K]`, K = the largest count in the batch, padded with -1.
    """
    ids = torch.as_tensor(
        [token_ids] if isinstance(token_ids, int) else list(token_ids), device=input_ids.device
    )
    is_vision = torch.isin(input_ids, ids)
    counts = is_vision.sum(-1)
    k = int(counts.max()) if counts.numel() else 0
    positions = torch.full((input_ids.shape[0], k), -1, dtype=torch.long, device=input_ids.device)
    rows, cols = is_vision.nonzero(as_tuple=True)
    # rank of each vision token within its row
    rank = torch.arange(rows.numel(), device=input_ids.device) - (counts.cumsum(0) - counts)[rows]
    positions[rows, rank] = cols
    return positions


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, heads, n, d]`, cos/sin `[B, n, r]` (the model's recomposed M-RoPE tables), r <= d: partial rotary
    (Qwen3.5) rotates the first r dimensions and passes the rest through, as transformers does."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]
    rotated, passed = x[..., :r], x[..., r:]
    return torch.cat((rotated * cos[:, None] + _rotate_half(rotated) * sin[:, None], passed), dim=-1)


def attention_from_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_positions: torch.Tensor,
    key_mask: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Float32 attention probabilities of selected query rows over the keys before them (parameter-free).

    query: `[B, n, heads, d]` pre-RoPE query states of the rows; key: `[B, Lk, kv_heads, d]` pre-RoPE keys of
    positions `0..Lk-1`; cos, sin: `[B, Lk, r]` (r <= d); query_positions: Long `[B, n]`, each `< Lk`; key_mask:
    Bool `[B, Lk]` (False at padding); sliding_window: keys `window` or more positions back are masked.
    Returns `[B, heads, n, Lk]`: each row is a causal softmax over the keys `<=` its position that are not
    padding (nor outside the window), and sums to 1.

    Float32 whatever autocast is active (the model-class forward under accelerate's bf16 mixed precision runs
    inside CPU/CUDA autocast, which would run the score matmul in bf16): the inputs are cast to float32 and the
    work runs with autocast off for their device.
    """
    with _without_autocast(query.device.type):
        query, key, cos, sin = (t.float() for t in (query, key, cos, sin))
        b, n, heads, d = query.shape
        length, kv_heads = key.shape[1], key.shape[2]
        index = query_positions[..., None].expand(-1, -1, cos.shape[-1])
        q = _rope(query.transpose(1, 2), cos.gather(1, index), sin.gather(1, index))  # [B, H, n, d]
        k = _rope(key.transpose(1, 2), cos, sin)  # [B, KV, Lk, d]
        # GQA without materialising repeated keys: group the query heads of each key/value head.
        q = q.reshape(b, kv_heads, -1, d)  # [B, KV, (H/KV)*n, d]; head h = kv * (H/KV) + r, as repeat_kv
        scores = torch.matmul(q, k.transpose(-1, -2)).view(b, heads, n, length) * scaling
        keys = torch.arange(length, device=query.device)
        allowed = (keys <= query_positions[..., None]) & key_mask[:, None, :]
        if sliding_window is not None:
            allowed &= keys > query_positions[..., None] - sliding_window
        allowed |= keys == query_positions[..., None]  # a row always sees itself (the model does too)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(scores, dim=-1)


def _without_autocast(device_type: str):
    """A context with autocast off for `device_type` (a no-op for devices without autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


def _guard_module_hooks_under_compile() -> None:
    """Make torch.compile notice the probe's hooks (see the module docstring).

    Dynamo skips guards on *empty* hook dicts by default (`skip_nnmodule_hook_guards`), so code it compiled for a
    decoder layer without hooks is reused for a hooked layer of the same class and the hooks never run. Off, an empty
    hook dict is guarded (one `len() == 0` check) and a hooked layer gets code that calls its hooks. Process-wide:
    it only adds guards, i.e. recompiles where hooks were added or removed.
    """
    import torch._dynamo

    if torch._dynamo.config.skip_nnmodule_hook_guards:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        logger.info(
            "torch._dynamo.config.skip_nnmodule_hook_guards set to False: compiled code now checks module hooks"
        )


@dataclass
class _LayerCapture:
    """What one supervised layer left behind in one forward (captured samples only)."""

    cos: torch.Tensor  # [B', Lk, d]
    sin: torch.Tensor
    query: torch.Tensor | None = None  # [B', n_c, H, d] pre-RoPE rows (n_c = L when every row is kept)
    key: torch.Tensor | None = None  # [B', Lk, KV, d] pre-RoPE keys
    with_grad: bool = True  # autograd was on when the layer ran


class AttentionProbe:
    """Captures the pre-RoPE q/k of the supervised decoder layers during a forward; attention rows on demand.

    Usage::

        probe = AttentionProbe(model, layers=[2, 7, 12, 17, 22, 27])
        with probe.capture(query_positions):  # Long [B, n], -1 = no row; None keeps every row (costs memory)
            outputs = model(**batch)          # any caller: the model's forward, TRL's fused backbone call, ...
        rows = probe.rows(query_positions, batch["attention_mask"])   # [layers, B, heads, n, L]

    Outside `capture()` the hooks do nothing, so inference and mask-less batches pay nothing. Within one
    `capture()` block the first forward is the one recorded (TRL's label-smoothing and return-outputs paths run a
    second, gradient-free forward for metrics). `capture()` first re-hooks any layer whose attention or q/k module
    was replaced since it was hooked (PEFT adapters applied after the probe was built), so the rows always include
    the adapters' weights. Works under torch.compile when the probe is built before the first compiled forward.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] | str | None = None,
        checkpoint_recompute: bool = True,
        family: FamilySpec | None = None,
    ):
        self.family = family or family_of(model)
        self.layers = supervised_layers(model, layers)
        decoder_layers = find_decoder_layers(model)
        self.checkpoint_recompute = checkpoint_recompute
        self._modules = [decoder_layers[i] for i in self.layers]
        self._captured: dict[int, _LayerCapture] = {}
        self._active = False
        self._query_positions: torch.Tensor | None = None
        self._selection: tuple[torch.Tensor, torch.Tensor | None, int] | None = None
        self._batch_size = 0
        self._full_length = 0
        _guard_module_hooks_under_compile()
        self._hooked: list[tuple[nn.Module, nn.Module, nn.Module] | None] = [None] * len(self._modules)
        self._handles: list[list] = [[] for _ in self._modules]
        for slot in range(len(self._modules)):
            self._attach(slot)

    # ---- hooks
    def _attach(self, slot: int) -> None:
        """Hook slot's attention module (rotary tables) and its current pre-RoPE q/k modules, replacing any earlier
        hooks of that slot. The hooks always run eagerly: Dynamo calls a `torch.compiler.disable`d hook as is."""
        for handle in self._handles[slot]:
            handle.remove()
        attn = self._modules[slot].self_attn
        q_module, k_module = self.family.pre_rope_modules(attn)
        self._hooked[slot] = (attn, q_module, k_module)
        eager = torch.compiler.disable  # a traced hook would not run under compile + checkpointing (HOP)
        self._handles[slot] = [
            attn.register_forward_pre_hook(eager(self._rotary_hook(slot)), with_kwargs=True),
            q_module.register_forward_hook(eager(self._state_hook(slot, attn.head_dim, "query"))),
            k_module.register_forward_hook(eager(self._state_hook(slot, attn.head_dim, "key"))),
        ]

    def _follow_replaced_modules(self) -> None:
        """Re-hook the layers whose attention or pre-RoPE q/k module is no longer the hooked one.

        `get_peft_model` after the probe was built replaces `q_proj` / `k_proj` by LoRA layers wrapping the hooked
        Linears (`base_layer`): their hooks would see `W·x` without the adapter's delta. Following the replacement
        gives the rows a probe built after the adapters would give (`merge_and_unload` is followed back the same way).
        """
        for slot, module in enumerate(self._modules):
            if self._hooked[slot] is None:  # removed
                continue
            attn = module.self_attn
            current = (attn, *self.family.pre_rope_modules(attn))
            if any(now is not hooked for now, hooked in zip(current, self._hooked[slot])):
                logger.info(
                    "decoder layer %d: attention q/k modules were replaced since the probe hooked them (e.g. PEFT "
                    "adapters applied after it was built); hooking the new ones (%s, %s)",
                    self.layers[slot], type(current[1]).__name__, type(current[2]).__name__,
                )  # fmt: skip
                self._attach(slot)

    # ---- hook bodies (run inside the supervised layers' forward; tensor slicing only)
    def _select(self, batch_size: int, length: int, device: torch.device):
        """(samples Long [B'], rows Long [B', n] or None for every row, key length) of this capture block."""
        if self._selection is None:
            self._batch_size, self._full_length = batch_size, length
            if self._query_positions is None:
                self._selection = (torch.arange(batch_size, device=device), None, length)
            else:
                positions = self._query_positions.to(device)
                if positions.shape[0] != batch_size:
                    raise ValueError(
                        f"capture(query_positions) has {positions.shape[0]} samples, the forward {batch_size}"
                    )
                samples = (positions >= 0).any(-1).nonzero(as_tuple=True)[0]
                rows = positions[samples]
                key_length = int(rows.max()) + 1 if rows.numel() else 0
                if key_length > length:
                    raise ValueError(f"query position {key_length - 1} beyond the sequence length {length}")
                self._selection = (samples, rows, key_length)
        return self._selection

    @staticmethod
    def _own_saved_tensors():
        """Save what the hooks' indexing needs for backward plainly, outside any activation-checkpoint frame.

        The hooks run inside the layer's forward, i.e. inside a non-reentrant checkpoint when the model uses one;
        tensors saved there would count as the layer's, and the recompute in backward (where the hooks are idle)
        would find a different number of them (`CheckpointError`). The innermost saved-tensor hooks win, so
        identity hooks keep the hooks' few index tensors out of the checkpoint's bookkeeping.
        """
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)

    @staticmethod
    def _keep(x: torch.Tensor, samples: torch.Tensor, key_length: int, own_storage: bool) -> torch.Tensor:
        """`x [B, L, ...]` -> the captured samples' first `key_length` positions.

        A subset of samples is gathered (a copy). With every sample, `own_storage` copies the slice when it is
        shorter than L, so the kept tensor does not hold the whole L-long tensor alive (a copy keeps the autograd
        graph: its backward needs no saved tensor); otherwise the result is a view of `x`.
        """
        if samples.numel() != x.shape[0]:
            return x[samples, :key_length]
        if key_length < x.shape[1]:
            x = x[:, :key_length]
            return x.clone(memory_format=torch.contiguous_format) if own_storage else x
        return x

    def _rotary_hook(self, slot: int):
        def hook(module, args, kwargs):
            if self._active and slot not in self._captured:
                hidden = args[0] if args else kwargs["hidden_states"]
                cos, sin = (
                    t.expand(hidden.shape[0], -1, -1) for t in kwargs["position_embeddings"]
                )  # 1-D RoPE: B=1
                samples, _, key_length = self._select(hidden.shape[0], hidden.shape[1], hidden.device)
                with self._own_saved_tensors():  # views of the tables every layer shares (module docstring)
                    self._captured[slot] = _LayerCapture(
                        cos=self._keep(cos, samples, key_length, own_storage=False),
                        sin=self._keep(sin, samples, key_length, own_storage=False),
                    )
            return None

        return hook

    def _state_hook(self, slot: int, head_dim: int, kind: str):
        """Forward hook keeping the query rows (`kind="query"`) or the keys (`"key"`) of one layer's forward."""

        def hook(module, args, output):
            record = self._captured.get(slot)
            if not self._active or record is None or getattr(record, kind) is not None:
                return None
            samples, rows, key_length = self._selection
            states = output.reshape(*output.shape[:2], -1, head_dim)  # [B, L, heads, d]
            with self._own_saved_tensors():
                if kind == "key":
                    kept = self._keep(states, samples, key_length, own_storage=True)
                else:
                    kept = states if rows is None else states[samples[:, None], rows.clamp(min=0)]
            setattr(record, kind, kept)
            record.with_grad = record.with_grad and torch.is_grad_enabled()
            return None

        return hook

    # ---- capture block
    @contextmanager
    def capture(self, query_positions: torch.Tensor | None = None) -> Iterator[AttentionProbe]:
        """Record the supervised layers' q/k during the first forward run inside this block.

        query_positions: Long `[B, n]` (-1 = no row): keep only these rows, of the samples that have any, and keys
        up to the last of them. None keeps every row of every sample (q of all tokens: analysis only).
        Layers whose q/k modules were replaced since they were hooked (adapters) are re-hooked first.
        """
        self._follow_replaced_modules()
        self.clear()
        self._query_positions = query_positions
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def clear(self) -> None:
        """Drop the captured tensors (they hold part of the graph)."""
        self._captured.clear()
        self._selection = None
        self._query_positions = None

    def remove(self) -> None:
        for handles in self._handles:
            for handle in handles:
                handle.remove()
        self._handles = [[] for _ in self._modules]
        self._hooked = [None] * len(self._modules)
        self.clear()

    # ---- parameter-free work after the forward
    def _locate(self, query_positions: torch.Tensor, batch_index: torch.Tensor | None):
        """Map the requested (sample, row) pairs onto the captured ones.

        Returns (captured sample slot Long [Bq], captured row slot Long [Bq, n], valid Bool [Bq, n]).
        """
        missing = [
            layer
            for slot, layer in enumerate(self.layers)
            if (record := self._captured.get(slot)) is None or record.key is None or record.query is None
        ]
        if missing:
            raise RuntimeError(
                f"no captured q/k for supervised layers {missing} (of {self.layers}): run the model forward inside "
                "`probe.capture()` first. If it did run there, the hooks in those layers did not fire: most likely "
                "the model is compiled (torch.compile, `torch_compile: true`, with or without activation "
                "checkpointing) and Dynamo reused code it had compiled before this probe hooked the layers. Build "
                "the probe before the first compiled forward (SwimSFTTrainer does), or call `torch._dynamo.reset()` "
                "after building it."
            )
        samples, rows, _ = self._selection
        device = samples.device
        query_positions = query_positions.to(device)
        valid = query_positions >= 0
        if batch_index is None:
            batch_index = torch.arange(query_positions.shape[0], device=device)
        batch_index = batch_index.to(device)
        if ((batch_index < 0) | (batch_index >= self._batch_size)).any():
            raise IndexError(
                f"batch_index {batch_index.tolist()} outside the captured batch ({self._batch_size})"
            )
        slot_of_sample = torch.full((self._batch_size,), -1, device=device)
        slot_of_sample[samples] = torch.arange(samples.numel(), device=device)
        sample_slot = slot_of_sample[batch_index]
        missing = valid.any(-1) & (sample_slot < 0)
        if missing.any():
            raise RuntimeError(
                f"samples {batch_index[missing].tolist()} have query rows but none were captured: pass the rows "
                "to `probe.capture(query_positions=...)`"
            )
        sample_slot = sample_slot.clamp(min=0)
        if rows is None:
            return sample_slot, query_positions.clamp(min=0), valid
        captured = rows[sample_slot]  # [Bq, n_c]
        match = (query_positions[..., None] == captured[:, None, :]) & valid[..., None]
        not_captured = valid & ~match.any(-1)
        if not_captured.any():
            b, j = not_captured.nonzero(as_tuple=True)
            raise RuntimeError(
                f"query rows {query_positions[b, j].tolist()} (samples {b.tolist()}) were not captured: pass them "
                "to `probe.capture(query_positions=...)` before the forward"
            )
        return sample_slot, match.int().argmax(-1), valid

    def _layer_inputs(
        self,
        query_positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        batch_index: torch.Tensor | None,
    ):
        """Per supervised layer: (decoder layer, q rows, keys, cos, sin, rows, key mask, scaling), then valid."""
        sample_slot, row_slot, valid = self._locate(query_positions, batch_index)
        rows = query_positions.to(sample_slot.device).clamp(min=0)
        all_samples = sample_slot.numel() == self._selection[0].numel() and torch.equal(
            sample_slot, torch.arange(sample_slot.numel(), device=sample_slot.device)
        )
        key_mask = _key_mask(attention_mask, query_positions.shape[0], self._full_length, rows.device)
        out = []
        for slot, module in enumerate(self._modules):
            record = self._captured[slot]
            if torch.is_grad_enabled() and not record.with_grad:
                raise RuntimeError(
                    f"decoder layer {self.layers[slot]} ran without autograd inside `capture()` while the attention "
                    "loss needs gradients: reentrant activation checkpointing runs the layers under no_grad. Use "
                    'activation_checkpointing_kwargs={"use_reentrant": false} (or no checkpointing).'
                )
            query = record.query[sample_slot[:, None], row_slot]  # [Bq, n, H, d]
            key, cos, sin = (
                (t if all_samples else t[sample_slot]) for t in (record.key, record.cos, record.sin)
            )
            length = key.shape[1]
            window = getattr(module.self_attn, "sliding_window", None)
            out.append(
                (module, query, key, cos, sin, rows, key_mask[:, :length], module.self_attn.scaling, window)
            )
        return out, valid

    def rows(
        self,
        query_positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention probabilities of the given rows over all keys: `[layers, B, heads, n, L]` (float32).

        query_positions: Long `[B, n]` (-1: that row comes back as zeros), rows that were captured;
        attention_mask: `[B, L]` 2-D padding mask (1 = token) or None; batch_index: optional Long `[B]`, the
        samples of the captured batch these rows belong to (default: 0..B-1).
        """
        layers, valid = self._layer_inputs(query_positions, attention_mask, batch_index)
        out = []
        for _, query, key, cos, sin, rows, key_mask, scaling, window in layers:
            probs = attention_from_qk(query, key, cos, sin, rows, key_mask, scaling, window)
            probs = torch.nn.functional.pad(probs, (0, self._full_length - key.shape[1]))
            out.append(probs * valid[:, None, :, None])
        return torch.stack(out)

    def vision_attention(
        self,
        query_positions: torch.Tensor,
        vision_positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        head_fusion: str = "mean",
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the given rows on the vision tokens, heads fused: `[layers, B, n, K]` (float32).

        query_positions: Long `[B, n]` (padding -1: those rows come back as zeros); vision_positions: Long
        `[B, K]` (padding -1: those columns come back as zeros); batch_index as in `rows`. head_fusion: "mean"
        (the heads' raw probabilities averaged) or "renorm_mean" (each head renormalised over the vision tokens of
        each group, then averaged: every head weighs the same; needs `groups` Long `[B, K]`, the group of each
        column, -1 for padding). When the model uses activation checkpointing, the softmax runs under a
        non-reentrant checkpoint, so only the `[B, n, K]` results are kept for backward.
        """
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
        if head_fusion != "mean" and groups is None:
            raise ValueError(f"head_fusion={head_fusion!r} needs the group of each vision token")
        layers, q_valid = self._layer_inputs(query_positions, attention_mask, batch_index)
        vision_positions = vision_positions.to(q_valid.device)
        k_valid = vision_positions >= 0
        v_pos = vision_positions.clamp(min=0)
        keep = q_valid[:, :, None] & k_valid[:, None, :]

        def per_layer(query, key, cos, sin, rows, key_mask, scaling, window):
            probs = attention_from_qk(query, key, cos, sin, rows, key_mask, scaling, window)  # [B, H, n, Lk]
            # vision tokens after the last captured row are causally invisible: probability 0
            pad = self._full_length - key.shape[1]
            if head_fusion == "mean":
                probs = torch.nn.functional.pad(probs.mean(1), (0, pad))  # [B, n, L]
                return probs.gather(2, v_pos[:, None, :].expand(-1, probs.shape[1], -1)) * keep
            probs = torch.nn.functional.pad(probs, (0, pad))  # [B, H, n, L]
            index = v_pos[:, None, None, :].expand(-1, *probs.shape[1:3], -1)
            return fuse_heads(probs.gather(3, index) * keep[:, None], groups, head_fusion)

        out = []
        for module, *inputs in layers:
            # Follow the model: when its layers trade compute for memory, so does the softmax.
            trade_memory = self.checkpoint_recompute and getattr(module, "gradient_checkpointing", False)
            if trade_memory and torch.is_grad_enabled() and inputs[0].requires_grad:
                out.append(checkpoint(per_layer, *inputs, use_reentrant=False))
            else:
                out.append(per_layer(*inputs))
        return torch.stack(out)


def _key_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2-D padding mask [B, L], got shape {tuple(attention_mask.shape)}")
    return attention_mask.to(device=device, dtype=torch.bool)


def attention_maps(
    model: nn.Module,
    inputs: dict,
    layers: Sequence[int],
    query_positions: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of chosen decoder layers and query rows over all keys.

    model: a (stock) model of a supported family; inputs: its forward inputs (`input_ids`, `attention_mask`,
    `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`, `mm_token_type_ids`, ...); layers: decoder
    layer indices; query_positions: Long `[B, n]`. Returns float32 `[len(layers), B, heads, n, seq_len]`, rows
    summing to 1 (causal + padding mask), equal to the `output_attentions=True` weights of an eager model.
    Runs under the caller's grad mode; temporary hooks are removed afterwards.
    """
    probe = AttentionProbe(model, layers, checkpoint_recompute=False)
    try:
        with probe.capture(query_positions):
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=1)
        return probe.rows(query_positions, inputs.get("attention_mask"))
    finally:
        probe.remove()
