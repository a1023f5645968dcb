"""`SegConfig`: the recipe keys of the optional segmentation head (`seg_head: true` turns it on).

Parsed by `swim train` next to the data, training and model arguments (flat YAML keys, CLI overrides), and handed
to `SwimSFTTrainer(seg=...)`, which adds the head as a plug-in. Defaults follow Sa2VA (loss weights) and the MBA
paper (λ/τ); "parity" values reproduce the authors' released code (docs/segmentation.md §6.4):

| key | default (ours) | parity (SALMA-1B code) | paper text |
|---|---|---|---|
| `mba_mode` | `off` (Sa2VA baseline); `fixed` recommended with MBA | `code` | `paper` |
| `mba_prior` | `prepass` | `prepass` | SAM-2 logits (paper §3.2) |
| `tmc_impl` | `fixed` | `parity` (= 0) | |
| `boundary_norm` | `per_sample` | `parity` | no formula |
| `mba_warmup_ratio` / `aux_warmup_ratio` | 0.10 / 0.20 | 0.10 / 0.20 | 0.05 / 0.05 (paper §4.1) |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swim.seg.head import PRIORS, QUERY_MODES, SegHeadConfig
from swim.seg.losses import BOUNDARY_NORMS, TMC_IMPLS
from swim.seg.mba import MBA_MODES

TMC_MASKS = ("gt", "pred")


@dataclass
class SegConfig:
    """Segmentation head (SAM-2, Sa2VA-style) with optional Mask-Biased Attention, TMC and boundary losses."""

    seg_head: bool = field(default=False, metadata={"help": "Add the segmentation head (off: plain SWIM)."})
    seg_sam: str | None = field(
        default=None,
        metadata={"help": "SAM-2 checkpoint folder (transformers layout), e.g. facebook/sam2.1-hiera-large."},
    )
    seg_query: str = field(
        default="ins_tag",
        metadata={"help": f"Prompt token, one of {QUERY_MODES}: the tagged word, or an added [SEG]."},
    )
    seg_token: str = field(default="[SEG]", metadata={"help": "The added token of `seg_query: seg_token`."})
    seg_freeze_encoder: bool = field(default=True, metadata={"help": "Freeze SAM-2's image encoder (Sa2VA)."})
    seg_max_frames: int = field(
        default=0, metadata={"help": "Frames given to SAM-2 per sample (0: every distinct sampled frame)."}
    )
    seg_weight: float = field(default=1.0, metadata={"help": "Weight of the mask loss (BCE + Dice)."})
    bce_weight: float = field(default=2.0, metadata={"help": "BCE weight in the mask loss (Sa2VA: 2.0)."})
    dice_weight: float = field(default=0.5, metadata={"help": "Dice weight in the mask loss (Sa2VA: 0.5)."})
    mba_mode: str = field(
        default="off", metadata={"help": f"Mask-Biased Attention: off or one of {MBA_MODES}."}
    )
    mba_prior: str = field(
        default="prepass", metadata={"help": f"MBA gate prior, one of {PRIORS} (swim_attn: our extension)."}
    )
    mba_heads: int = field(default=8, metadata={"help": "MBA attention heads (code: 8)."})
    mba_top_k: int = field(
        default=2, metadata={"help": "MBA top-K expression tokens (code: 2; paper: not given)."}
    )
    mba_dropout: float = field(default=0.1, metadata={"help": "MBA attention dropout (code: 0.1)."})
    mba_tau: float = field(
        default=1.0, metadata={"help": "τ_gate of σ(M/τ) for the prepass prior (paper: 1.0)."}
    )
    mba_expr_tokens: int = field(default=32, metadata={"help": "Expression tokens offered to MBA's router."})
    mba_warmup_ratio: float = field(
        default=0.10,
        metadata={"help": "Share of the steps over which γ's scale ramps 0 → 1 (code 0.10, paper 0.05)."},
    )
    tmc_impl: str = field(
        default="fixed", metadata={"help": f"TMC loss, one of {TMC_IMPLS} (parity: the released 0)."}
    )
    tmc_weight: float = field(default=0.1, metadata={"help": "λ_tmc (paper: 0.1)."})
    tmc_tau: float = field(default=0.15, metadata={"help": "τ_tmc (paper: 0.15)."})
    tmc_mask: str = field(
        default="gt", metadata={"help": f"TMC pooling mask, one of {TMC_MASKS} (code: gt)."}
    )
    tmc_detach_visual: bool = field(default=True, metadata={"help": "Detach TMC's visual side (code: true)."})
    boundary_weight: float = field(default=0.05, metadata={"help": "λ_bound (paper: 0.05)."})
    boundary_norm: str = field(default="per_sample", metadata={"help": f"One of {BOUNDARY_NORMS}."})
    aux_warmup_ratio: float = field(
        default=0.20,
        metadata={"help": "Share of the steps over which TMC and boundary ramp in (code 0.20, paper 0.05)."},
    )

    def __post_init__(self):
        if not self.seg_head:
            return
        if not self.seg_sam:
            raise ValueError("seg_head: true needs seg_sam (a SAM-2 checkpoint folder)")
        if self.mba_mode != "off" and self.mba_mode not in MBA_MODES:
            raise ValueError(f"mba_mode must be off or one of {MBA_MODES}, got {self.mba_mode!r}")
        if self.tmc_impl not in TMC_IMPLS:
            raise ValueError(f"tmc_impl must be one of {TMC_IMPLS}, got {self.tmc_impl!r}")
        if self.tmc_mask not in TMC_MASKS:
            raise ValueError(f"tmc_mask must be one of {TMC_MASKS}, got {self.tmc_mask!r}")
        if self.boundary_norm not in BOUNDARY_NORMS:
            raise ValueError(f"boundary_norm must be one of {BOUNDARY_NORMS}, got {self.boundary_norm!r}")
        for name in ("mba_warmup_ratio", "aux_warmup_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.head_config(llm_hidden=1)  # validates the head settings with their field names

    def head_config(
        self, llm_hidden: int, prior_layers: list[int] | None = None, query_offset: int = 0
    ) -> SegHeadConfig:
        return SegHeadConfig(
            llm_hidden=llm_hidden, query=self.seg_query, seg_token=self.seg_token,
            mba_mode=None if self.mba_mode == "off" else self.mba_mode, mba_prior=self.mba_prior,
            mba_heads=self.mba_heads, mba_top_k=self.mba_top_k, mba_dropout=self.mba_dropout, mba_tau=self.mba_tau,
            mba_expr_tokens=self.mba_expr_tokens, prior_layers=prior_layers, query_offset=query_offset,
        )  # fmt: skip
