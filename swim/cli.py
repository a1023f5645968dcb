"""`swim` command line: one entry point, subcommands dispatched lazily to their modules.

Each subcommand lives in the module that owns the work and exposes `main(argv)`; importing is deferred so
that `swim --help` is instant and `swim tiny` does not import TRL.
"""

from __future__ import annotations

import importlib
import logging
import sys

# subcommand -> (module, help). Two-word commands ("data synth", "eval bench-q") are keyed with a space.
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny": ("swim.tiny", "write a tiny random checkpoint (--family qwen2_5_vl|qwen2_vl|qwen3_vl|...)"),
    "train": ("swim.train", "SFT with the attention-grounding loss (--config RECIPE.yaml)"),
    "merge-lora": ("swim.merge_lora", "merge a LoRA training output into a stock checkpoint (+ seg_head/)"),
    "demo": ("swim.demos.cli", "synthetic data + tiny model: baseline vs SWIM grounding report"),
    "pretrain": ("swim.demos.pretrain", "the demos' pretrained tiny base (next-token only), cached by hash"),
    "data synth": (
        "swim.data.synth.cli",
        "write the synthetic shapes videos, or a KLAL image task (--task ...)",
    ),
    "data rvos": ("swim.data.rvos", "MeViS / Ref-YouTube-VOS / Ref-DAVIS17 split -> NL-Refer-style records"),
    "data build": (
        "swim.data.nl_refer.build",
        "VideoRefer-700K / Bench -> NL-Refer: LLM rewriting into <ins> tags",
    ),
    "data synonyms": (
        "swim.data.nl_refer.synonyms",
        "the -synonym benchmark variant: tagged head nouns replaced",
    ),
    "data filter-videos": (
        "swim.data.filter_videos",
        "LLaVA-Video-178K: merge, absolute paths, drop bad videos",
    ),
    "validate": ("swim.data.validate", "check record files / mixtures for bad records"),
    "infer": ("swim.eval.infer", "answer a question about a video"),
    "eval bench-q": ("swim.eval.bench_q", "VideoRefer-Bench-Q accuracy"),
    "eval bench-d": ("swim.eval.bench_d", "VideoRefer-Bench-D descriptions scored by an LLM judge"),
    "eval grounding": ("swim.eval.grounding", "attention-grounding metrics of the supervised rows"),
    "eval answers": ("swim.eval.answers", "answer accuracy on task records (exact, count, point, box IoU)"),
    "eval rvos": ("swim.eval.rvos", "referring video segmentation: J, F, J&F (segmentation head)"),
    "eval refcoco": ("swim.eval.refcoco", "referring image segmentation: cIoU, gIoU (segmentation head)"),
    "seg tiny-sam2": ("swim.seg.sam2", "write a tiny random SAM-2 checkpoint (tests, CPU demo)"),
    "seg pretrain-sam2": (
        "swim.demos.sam_base",
        "the segmentation demo's pretrained tiny SAM-2 (boxes -> masks + cell labels), cached by hash",
    ),
    "seg demo": (
        "swim.demos.seg_demo",
        "segmentation head: Sa2VA baseline vs MBA with three priors, J&F report",
    ),
    "vis": ("swim.vis.attention", "attention overlays (PNG grid, GIF)"),
    "bench overhead": ("swim.bench.overhead", "attention-capture overhead benchmark"),
}


def _usage() -> str:
    lines = ["usage: swim COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for n_words in (2, 1):
        name = " ".join(argv[:n_words])
        if len(argv) >= n_words and name in COMMANDS:
            module = importlib.import_module(COMMANDS[name][0])
            module.main(argv[n_words:])  # results are written by the command; the exit status stays 0
            return
    print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)


if __name__ == "__main__":
    main()
