"""`SegHead`: a Sa2VA-style SAM-2 mask decoder prompted by the LLM, with optional Mask-Biased Attention.

Data flow (shapes: F frames, Q objects (queries), P (frame, object) pairs, d LLM hidden, C SAM-2 hidden,
S input side, h = S/16 embedding side, m = S/4 mask side; docs/segmentation.md §6.3):

1. `query_hidden [Q, d]` — the last-layer hidden state of each object's query token (`swim.seg.probe`) — goes
   through Sa2VA's `Linear(d, d) – ReLU – Linear(d, C)` to the prompt vector `[Q, C]`.
2. SAM-2's image encoder (frozen by default, as in Sa2VA) turns `pixel_values [F, 3, S, S]` into the embedding
   `[F, C, h, h]` (+ `no_memory_embedding`) and two high-resolution levels projected by the decoder's
   `conv_s0` / `conv_s1` (trained with the decoder).
3. With MBA on, the embedding of each pair is `F_v + γ·s·(MHA(...) ⊙ G)` (`swim.seg.mba`), the gate G built from
   the prior: `prepass` — the paper's/code's prompt-free decoder pass (only SAM-2's padding point), best of 3 by
   predicted IoU, detached, bilinear to h×h, σ(M/τ); `none` — G = 1 (the control); `swim_attn` — SWIM's attention
   map of the object, given by the caller (our extension, not the paper's).
4. The mask decoder takes sparse prompts `[padding point tokens, prompt]` (Sa2VA appends the language vector after
   SAM-2's padding point), dense `no_mask_embed`, single-mask output -> logits `[P, m, m]`.

Distributed training. Every SAM-2 weight is used inside its own module's forward, except a few that SAM-2's code
reads in a parent's forward (the decoder's `iou_token`, `mask_tokens`, `obj_score_token`; the prompt encoder's
`not_a_point_embed`, `no_mask_embed`) and `no_memory_embedding`, which the head adds itself (it calls SAM-2's
submodules, never `Sam2Model.forward`; that weight stays frozen, it is SAM-2's "no memory" marker):
`external_parameters` names them so that DeepSpeed ZeRO-3 gathers them with the module that reads them. The weights the objective never reaches are
frozen too — SAM-2's IoU and object-score heads (Sa2VA trains neither), and MBA's router in `code`/`paper` mode,
which only picks indices (defect D2) — so every trainable weight receives a gradient (possibly zero, e.g. MBA's
attention while γ = 0) on every step of every rank, with or without masks: DDP runs with
`find_unused_parameters=False` and ZeRO-3 reduces the same parameters everywhere.

The decoder's stability-based fallback to a multimask output (`dynamic_multimask_via_stability`, on in eval mode
only) is turned off: the language-prompted single-mask token is the one trained, so inference uses it too.

Saved as `seg_head/` beside the LLM: `sam2/` (a stock `Sam2Model` folder), `head.safetensors` (projection, MBA)
and `seg_head.json` (`SegHeadConfig`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from swim.seg.losses import masked_average
from swim.seg.mba import MBA_MODES, MaskBiasedAttention

QUERY_MODES = ("ins_tag", "seg_token")
PRIORS = ("prepass", "none", "swim_attn")
CONFIG_NAME, WEIGHTS_NAME, SAM_DIR = "seg_head.json", "head.safetensors", "sam2"


@dataclass
class SegHeadConfig:
    """What the head is and how it is prompted: everything inference needs besides the weights."""

    llm_hidden: int
    query: str = "ins_tag"
    seg_token: str = "[SEG]"
    mba_mode: str | None = None  # None: no MBA (the Sa2VA baseline)
    mba_prior: str = "prepass"
    mba_heads: int = 8
    mba_top_k: int = 2
    mba_dropout: float = 0.1
    mba_tau: float = 1.0
    mba_expr_tokens: int = 32
    prior_layers: list[int] | None = field(default=None)  # SWIM's supervised layers (swim_attn prior)
    query_offset: int = 0  # SWIM's supervised row = tagged position + offset (swim_attn prior)

    def __post_init__(self):
        if self.query not in QUERY_MODES:
            raise ValueError(f"seg_query must be one of {QUERY_MODES}, got {self.query!r}")
        if self.mba_mode is not None and self.mba_mode not in MBA_MODES:
            raise ValueError(f"mba_mode must be one of {MBA_MODES} or off, got {self.mba_mode!r}")
        if self.mba_prior not in PRIORS:
            raise ValueError(f"mba_prior must be one of {PRIORS}, got {self.mba_prior!r}")


@dataclass
class SegHeadOutput(ModelOutput):
    """A `ModelOutput` (a dict): DeepSpeed ZeRO-3's backward hooks find the output tensors there."""

    logits: torch.Tensor | None = None  # [P, m, m] mask logits of each pair
    prompts: torch.Tensor | None = None  # [Q, C] prompt vectors (TMC's text side)
    pooled: torch.Tensor | None = None  # [P, C] pre-MBA embedding under the pool weights (TMC's visual side)
    gate: torch.Tensor | None = None  # [P, h, h] the MBA gate used (None without MBA)
    gamma: torch.Tensor | None = None  # MBA's γ (detached; None without MBA)


class SegHead(nn.Module):
    def __init__(self, config: SegHeadConfig, sam):
        super().__init__()
        self.config = config
        self.sam = sam
        sam.mask_decoder.dynamic_multimask_via_stability = False
        hidden = sam.config.mask_decoder_config.hidden_size
        d = config.llm_hidden
        self.text_hidden_fcs = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, hidden))
        self.expr_proj = nn.Linear(d, hidden) if config.mba_mode in ("paper", "fixed") else None
        self.mba = (
            MaskBiasedAttention(
                hidden, config.mba_heads, config.mba_top_k, config.mba_dropout, config.mba_mode
            )
            if config.mba_mode is not None
            else None
        )
        # Sa2VA trains the decoder only (the prompts are SAM-2's padding tokens); the weights the objective never
        # reaches are frozen too (see the module docstring)
        self.sam.prompt_encoder.requires_grad_(False)
        self.sam.no_memory_embedding.requires_grad_(False)
        self.sam.mask_decoder.iou_prediction_head.requires_grad_(False)
        self.sam.mask_decoder.pred_obj_score_head.requires_grad_(False)
        if self.mba is not None and config.mba_mode != "fixed":
            self.mba.router.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.sam.config.mask_decoder_config.hidden_size

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (default, Sa2VA) or train SAM-2's image encoder."""
        self.sam.vision_encoder.requires_grad_(not frozen)

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, weight) pairs where SAM-2's code reads a child's weight in the parent's forward (ZeRO-3 must
        gather them with that module: `deepspeed.zero.register_external_parameter`)."""
        decoder, prompts = self.sam.mask_decoder, self.sam.prompt_encoder
        return [
            *[(decoder, e.weight) for e in (decoder.iou_token, decoder.mask_tokens, decoder.obj_score_token)],
            *[(prompts, e.weight) for e in (prompts.not_a_point_embed, prompts.no_mask_embed)],
            (self, self.sam.no_memory_embedding),
            *([(self, self.mba.gamma)] if self.mba is not None else []),  # read for the logs
        ]

    # ---- pieces (called from forward)
    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`[F, 3, S, S]` -> (embedding `[F, C, h, h]`, high-resolution levels `[F, C/8, m, m]`, `[F, C/4, 2h, 2h]`)."""
        encoder_trains = any(p.requires_grad for p in self.sam.vision_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
            levels = self.sam.vision_encoder(pixel_values, return_dict=True).fpn_hidden_states
        memory = self.sam.no_memory_embedding.reshape(1, -1, 1, 1)
        high_res = [self.sam.mask_decoder.conv_s0(levels[0]), self.sam.mask_decoder.conv_s1(levels[1])]
        return levels[2] + memory, high_res

    def _prompt_tokens(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM-2's prompt encoding of "no point" (its padding point, label -1 at (0, 0), padded to two tokens):
        sparse `[n, 1, 2, C]`, dense `no_mask_embed` `[n, C, h, h]`."""
        points = like.new_zeros(n, 1, 1, 2)
        labels = -torch.ones(n, 1, 1, dtype=torch.int32, device=like.device)
        return self.sam.prompt_encoder(
            input_points=points, input_labels=labels, input_boxes=None, input_masks=None
        )

    def _decode(self, embedding, high_res, sparse, dense, multimask: bool):
        pe = self.sam.get_image_wide_positional_embeddings().to(embedding.dtype)
        masks, iou, _, _ = self.sam.mask_decoder(
            image_embeddings=embedding, image_positional_embeddings=pe.expand(embedding.shape[0], -1, -1, -1),
            sparse_prompt_embeddings=sparse.to(embedding.dtype), dense_prompt_embeddings=dense.to(embedding.dtype),
            multimask_output=multimask, high_resolution_features=high_res,
        )  # fmt: skip
        return masks[:, 0], iou[:, 0]  # [n, k, m, m], [n, k]

    @torch.no_grad()
    def prepass_gate(self, embedding: torch.Tensor, high_res: list[torch.Tensor]) -> torch.Tensor:
        """The paper's prior: σ(M/τ) of the prompt-free decoder pass (best of 3 by predicted IoU) at h×h, `[F, h, h]`."""
        sparse, dense = self._prompt_tokens(embedding.shape[0], embedding)
        masks, iou = self._decode(embedding, high_res, sparse, dense, multimask=True)
        best = masks[torch.arange(masks.shape[0]), iou.argmax(-1)]  # [F, m, m]
        side = embedding.shape[-1]
        low = F.interpolate(best[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[
            :, 0
        ]
        return torch.sigmoid(low / self.config.mba_tau)

    def forward(
        self,
        pixel_values: torch.Tensor,
        query_hidden: torch.Tensor,
        pair_frame: torch.Tensor,
        pair_query: torch.Tensor,
        *,
        expr_hidden: torch.Tensor | None = None,
        expr_mask: torch.Tensor | None = None,
        prior: torch.Tensor | None = None,
        pool_weights: torch.Tensor | str | None = None,
        mba_scale: float = 1.0,
    ) -> SegHeadOutput:
        """pixel_values `[F, 3, S, S]`; query_hidden `[Q, d]`; pair_frame / pair_query Long `[P]` (the frame and
        object of each pair); expr_hidden `[Q, N, d]` + expr_mask Bool `[Q, N]` (MBA `paper`/`fixed` keys); prior
        `[P, h, h]` in [0, 1] (the `swim_attn` gate); pool_weights `[P, h, h]` (TMC pooling of the pre-MBA
        embedding; "pred": σ of the predicted logits, detached, area-pooled to h×h; None: no pooling); mba_scale:
        γ warm-up factor."""
        prompts = self.text_hidden_fcs(query_hidden.to(self.text_hidden_fcs[0].weight.dtype))
        embedding, high_res = self.image_features(pixel_values)
        pair_embedding = visual = embedding[pair_frame]  # [P, C, h, h]
        gate = None
        if self.mba is not None:
            if self.config.mba_prior == "prepass":
                gate = self.prepass_gate(embedding, high_res)[pair_frame]
            elif self.config.mba_prior == "none":
                gate = torch.ones_like(pair_embedding[:, 0])
            else:
                if prior is None:
                    raise ValueError("mba_prior swim_attn needs the attention prior of every pair")
                gate = prior.to(pair_embedding.dtype)
            tokens = mask = None
            if self.expr_proj is not None:
                tokens, mask = (
                    self.expr_proj(expr_hidden.to(prompts.dtype))[pair_query],
                    expr_mask[pair_query],
                )
            pair_embedding = self.mba(pair_embedding, gate, prompts[pair_query], tokens, mask, mba_scale)
        sparse, dense = self._prompt_tokens(pair_frame.shape[0], pair_embedding)
        sparse = torch.cat([sparse, prompts[pair_query][:, None, None, :].to(sparse.dtype)], dim=2)
        logits = self._decode(
            pair_embedding, [h[pair_frame] for h in high_res], sparse, dense, multimask=False
        )[0][:, 0]
        if isinstance(pool_weights, str):
            scale = logits.shape[-1] // visual.shape[-1]
            pool_weights = F.avg_pool2d(logits.detach().float().sigmoid()[:, None], scale)[:, 0]
        pooled = masked_average(visual, pool_weights) if pool_weights is not None else None
        gamma = self.mba.gamma.detach().clone() if self.mba is not None else None
        return SegHeadOutput(logits=logits, prompts=prompts, pooled=pooled, gate=gate, gamma=gamma)

    # ---- checkpoints
    def save_pretrained(
        self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write `directory/{sam2/, head.safetensors, seg_head.json}` (state_dict: the head's own keys, optional)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        sam_state = {k[len("sam.") :]: v for k, v in state.items() if k.startswith("sam.")}
        self.sam.save_pretrained(directory / SAM_DIR, state_dict=sam_state)
        rest = {k: v.detach().contiguous().cpu() for k, v in state.items() if not k.startswith("sam.")}
        save_file(rest, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> SegHead:
        from safetensors.torch import load_file
        from transformers import Sam2Model

        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (not a segmentation head folder)")
        config = SegHeadConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        head = cls(config, Sam2Model.from_pretrained(directory / SAM_DIR))
        missing, unexpected = head.load_state_dict(load_file(directory / WEIGHTS_NAME), strict=False)
        missing = [k for k in missing if not k.startswith("sam.")]
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_NAME}: missing {missing}, unexpected {unexpected}")
        return head.to(dtype) if dtype is not None else head

    def checkpoint_state(self, directory: str | Path) -> dict[str, torch.Tensor]:
        """The state dict saved in `directory` (for resuming into this head), keys as in `state_dict()`."""
        saved = SegHead.from_pretrained(directory)
        return saved.state_dict()
