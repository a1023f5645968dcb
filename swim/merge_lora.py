"""Merge a LoRA training output into a plain checkpoint of the stock class, which every `swim eval` tool loads.

    swim merge-lora output/sa2va-mba-7b output/sa2va-mba-7b-merged [--base Qwen/Qwen2.5-VL-7B-Instruct]

`swim train --use_peft` saves the adapter only (`adapter_config.json`, `adapter_model.safetensors`), plus the
tokenizer and, with the segmentation head, `seg_head/`. This loads the base model named in the adapter config (or
`--base`), applies and merges the adapter (`PeftModel.merge_and_unload`), resizes the embeddings to the saved
tokenizer when tokens were added (`[SEG]`), and writes a stock folder with the tokenizer, the processor files and
`seg_head/` copied beside it. The folder is checked to be in the stock layout (`swim.checkpoint`): the processor (the
adapter folder's, which `swim train` saves there, else the base's, local or a hub name) beside weights under the stock
tensor names.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from swim.checkpoint import RunProcessor, check_stock_layout, stock_layout
    from swim.modeling.model import stock_model_class

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = base or config["base_model_name_or_path"]
    model = stock_model_class(base).from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    with stock_layout(merged):
        merged.save_pretrained(out_dir)
    processor_source = adapter_dir if (adapter_dir / "preprocessor_config.json").exists() else base
    RunProcessor(processor_source, tokenizer).save(out_dir)
    check_stock_layout(out_dir, merged.config)
    if (adapter_dir / "seg_head").is_dir():
        shutil.copytree(adapter_dir / "seg_head", out_dir / "seg_head", dirs_exist_ok=True)
    logger.info("merged %s into %s -> %s", adapter_dir, base, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="swim merge-lora", description=__doc__.splitlines()[0])
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--base", help="base checkpoint (default: the adapter config's base_model_name_or_path)"
    )
    args = parser.parse_args(argv)
    merge_lora(args.adapter_dir, args.out_dir, args.base)
