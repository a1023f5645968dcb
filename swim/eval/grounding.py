"""Attention-grounding evaluation: where do the supervised rows (tagged words, answer tokens) look?

    swim eval grounding --model DIR --data FILE [--data-root R] [--out DIR] [--layers 2 7 ...] [--query-offset 0]
                        [--query tags|answer_last|answer_all]

For every record with an annotation, the question and answer are teacher-forced, and the attention rows of the
supervised tokens are computed from the q/k captured in that forward (`swim.modeling.AttentionProbe`) for the
chosen layers. Per (row, group) pair with an annotation, on the merged token grid of that group (a video's
temporal group or an image; heads fused as in training, renormalised over the group's tokens):

- `pointing_game`: the arg-max token is inside the object (its cell covered by at least `min_cover` of mask);
- `pointing_game_at_k`: fraction of the top-k tokens inside the object (the reference's GamePoint@k);
- `auc`: ROC-AUC of the map against the inside/outside labels (pairs whose group is all inside or all outside
  are counted in `auc_undefined`, not averaged);
- `nss`: mean z-scored attention over the inside tokens;
- `mask_mass`: attention mass on tokens the mask touches at all;
- `attn_ratio`: KLAL's attention ratio (its Figure 4): the mean attention of the inside tokens over the mean
  attention of all the group's tokens (1 for uniform attention, `1 / chance_pointing_game` at most).
Reported per layer and for the layers' fused map (mean of the group-normalised maps), with the chance level of a
uniformly random token (`chance_pointing_game`) and of uniform attention (`chance_mask_mass`). Micro-average
over pairs (the ratio too: the mean of the per-pair ratios). Works for any checkpoint of a supported family, so
stock and fine-tuned models can be compared.

The rows are those the data side supervises (`--query`: the `<ins>`-tagged words, or KLAL's answer tokens), and
a group is a video's temporal group or an image; "inside" reads the annotation's area map (mask, box, points or
line), whatever target the loss was trained with.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from swim.data.tags import QUERY_MODES, SWIM_SYSTEM_PROMPT
from swim.modeling.capture import (
    AttentionProbe,
    parse_layers,
    supervised_layers,
    vision_token_ids,
    vision_token_positions,
)
from swim.modeling.losses import HEAD_FUSIONS, group_normalize
from swim.modeling.objective import supervised_rows

logger = logging.getLogger(__name__)


@dataclass
class GroundingMetricsConfig:
    min_cover: float = 0.05  # a token is "inside" when the mask covers at least this fraction of its cell
    top_k: int = 5


def map_metrics(attn: torch.Tensor, target: torch.Tensor, cfg: GroundingMetricsConfig) -> dict[str, float]:
    """Metrics of one map on one temporal group's tokens.

    attn: `[m]` non-negative attention on the group's tokens (any scale); target: `[m]` mask cover fractions.
    Ties count fractionally (a uniform map scores the chance level, not 0 or 1). AUC is NaN when every token is
    inside or every token is outside.
    """
    p = attn.double() / attn.double().sum().clamp_min(1e-300)
    inside = target >= cfg.min_cover
    n_in = int(inside.sum())
    peak = p == p.max()
    k = min(cfg.top_k, p.numel())
    kth = p.topk(k).values[-1]
    above, at_kth = p > kth, p == kth
    # the top-k set takes every token above the k-th value and a share of the tokens tied with it
    share = (k - int(above.sum())) / int(at_kth.sum())
    in_top_k = float((above & inside).sum()) + share * float((at_kth & inside).sum())
    if 0 < n_in < p.numel():
        diff = p[inside][:, None] - p[~inside][None, :]
        auc = float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())
    else:
        auc = float("nan")
    z = (p - p.mean()) / p.std(unbiased=False).clamp_min(1e-300)
    return {
        "attn_ratio": float(p[inside].mean() / p.mean()) if n_in else float("nan"),
        "pointing_game": float((peak & inside).sum()) / float(peak.sum()),
        "pointing_game_at_k": in_top_k / k,
        "auc": auc,
        "nss": float(z[inside].mean()) if n_in else float("nan"),
        "mask_mass": float(p[target > 0].sum()),
        "chance_pointing_game": n_in / p.numel(),
        "chance_mask_mass": float((target > 0).sum()) / p.numel(),
    }


def pair_metrics(
    attn: torch.Tensor,
    target: torch.Tensor,
    groups: torch.Tensor,
    valid: torch.Tensor,
    cfg: GroundingMetricsConfig,
) -> list[dict[str, float]]:
    """`map_metrics` of every valid (row, group) pair that has at least one inside token.

    attn, target: `[B, n, K]`; groups: `[B, K]` (-1 padding); valid: `[B, n, G]`.
    """
    out = []
    for b, row, g in valid.nonzero().tolist():
        tokens = groups[b] == g
        t = target[b, row, tokens]
        if bool((t >= cfg.min_cover).any()):
            out.append(map_metrics(attn[b, row, tokens], t, cfg))
    return out


class MetricAccumulator:
    """Micro-averages pair metrics per map name ("layer 3", "fused"); NaN (undefined) values are counted."""

    def __init__(self):
        self.pairs: dict[str, list[dict[str, float]]] = defaultdict(list)

    def add(self, name: str, pairs: list[dict[str, float]]) -> None:
        self.pairs[name].extend(pairs)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, pairs in self.pairs.items():
            row: dict[str, float] = {"pairs": len(pairs)}
            for key in pairs[0] if pairs else ():
                values = [p[key] for p in pairs if not math.isnan(p[key])]
                row[key] = sum(values) / len(values) if values else float("nan")
                if len(values) < len(pairs):
                    row[f"{key}_undefined"] = len(pairs) - len(values)
            out[name] = row
        return out


@torch.no_grad()
def evaluate_grounding(
    model,
    batches,
    layers: list[int] | None,
    *,
    query_offset: int = 0,
    head_fusion: str = "mean",
    metrics: GroundingMetricsConfig | None = None,
) -> dict[str, dict[str, float]]:
    """Grounding metrics of `model` over collated `batches` (docs/batch_contract.md):
    {"fused": {...}, "layer L": {...}}, each micro-averaged over (row, group) pairs. `layers`: decoder layer
    indices, "all", or None (the default supervised layers of the model); `head_fusion` as in training."""
    metrics = metrics or GroundingMetricsConfig()
    device = next(model.parameters()).device
    probe = AttentionProbe(model, layers, checkpoint_recompute=False)
    layers = probe.layers
    acc = MetricAccumulator()
    try:
        for batch in batches:
            grounding = batch.pop("grounding")
            batch.pop("labels", None)
            if grounding is None:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            grounding = {k: v.to(device) for k, v in grounding.items()}
            rows = supervised_rows(grounding, query_offset)
            with probe.capture(rows):
                model(**batch, use_cache=False, logits_to_keep=1)
            vision_positions = vision_token_positions(batch["input_ids"], vision_token_ids(model.config))
            k = vision_positions.shape[1]
            groups = grounding["vision_token_group"][:, :k]
            attn = probe.vision_attention(rows, vision_positions, batch["attention_mask"], head_fusion=head_fusion,
                                          groups=groups)  # [Λ, B, n, K]  # fmt: skip
            probe.clear()
            obj = grounding["query_objects"].clamp(min=0)
            target = grounding["object_targets"][..., :k].gather(1, obj[..., None].expand(-1, -1, k))
            num_groups = grounding["object_group_valid"].shape[-1]
            valid = grounding["object_group_valid"].gather(1, obj[..., None].expand(-1, -1, num_groups))
            valid = valid & (rows >= 0)[..., None]
            normalised = torch.stack([group_normalize(a, groups, num_groups) for a in attn])
            fused = normalised.mean(0)
            acc.add("fused", pair_metrics(fused, target, groups, valid, metrics))
            for layer, layer_map in zip(layers, normalised):
                acc.add(f"layer {layer}", pair_metrics(layer_map, target, groups, valid, metrics))
    finally:
        probe.remove()
    return acc.summary()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swim eval grounding", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="record file (NL-Refer / Bench format with masks)")
    parser.add_argument("--data-root", help="default: the data file's folder")
    parser.add_argument("--out", help="write grounding.json here")
    parser.add_argument(
        "--layers", nargs="+", help="layer indices or `all`; default: the supervised-layer rule"
    )
    parser.add_argument("--query", default="tags", choices=QUERY_MODES, help="supervised rows (attn_query)")
    parser.add_argument("--query-offset", type=int, default=0, choices=[0, -1])
    parser.add_argument("--head-fusion", default="mean", choices=HEAD_FUSIONS, help="as attn_head_fusion")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--max-frames", type=int, default=32)
    parser.add_argument("--min-pixels", type=int, help="default: the model family's (128 merged tokens)")
    parser.add_argument("--max-pixels", type=int, help="default: the model family's (768 merged tokens)")
    parser.add_argument("--min-cover", type=float, default=0.05)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument(
        "--system-prompt", default=SWIM_SYSTEM_PROMPT, help="as in training (default: SWIM's)"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    from swim.data.collator import SwimCollator
    from swim.data.dataset import SwimDataset
    from swim.data.records import load_records
    from swim.modeling.families import family_of
    from swim.modeling.model import stock_model_class

    args = _parser().parse_args(argv)
    records, problems = load_records(args.data, data_root=args.data_root, errors="collect")
    for problem in problems:
        logger.warning("skipping %s", problem)
    records = [r for r in records if getattr(r, "annotation", None)][: args.limit]
    if not records:
        raise SystemExit(f"{args.data}: no record with masks to evaluate")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    family = family_of(args.model)
    settings = family.video_settings(num_frames=args.num_frames, max_frames=args.max_frames,
                                     min_pixels=args.min_pixels, max_pixels=args.max_pixels)  # fmt: skip
    dataset = SwimDataset(records, settings, tokenizer, supervise_qa=True, system_prompt=args.system_prompt,
                          family=family, query=args.query)  # fmt: skip
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, collate_fn=SwimCollator(tokenizer.pad_token_id)
    )
    model = stock_model_class(args.model).from_pretrained(args.model).eval()
    layers = supervised_layers(model, parse_layers(args.layers))
    summary = evaluate_grounding(
        model, tqdm(loader, desc="grounding"), layers, query_offset=args.query_offset,
        head_fusion=args.head_fusion, metrics=GroundingMetricsConfig(args.min_cover, args.top_k),
    )  # fmt: skip
    result = {"model": str(args.model), "data": str(args.data), "layers": layers, "records": len(records),
              "skipped_records": dataset.skips.summary(), "metrics": summary,
              "settings": {**asdict(GroundingMetricsConfig(args.min_cover, args.top_k)), "query": args.query,
                           "query_offset": args.query_offset, "head_fusion": args.head_fusion}}  # fmt: skip
    fused = summary.get("fused", {})
    logger.info("fused: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in fused.items()})
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "grounding.json").write_text(json.dumps(result, indent=2))
    return result
