"""Checkpoint folders that every stock tool opens: the processor beside the weights, the weights under stock names.

A folder written by `swim train` (the final one and every `checkpoint-N`), `swim merge-lora` or the segmentation
head's trainer is meant to be a plain checkpoint of the stock class: `AutoProcessor.from_pretrained(folder)` plus
`Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)` (or the family's class) load it, and weight loaders that
key on the stock tensor names (vLLM's `hf_to_vllm_mapper`, conversion scripts) find every tensor. Two things stood in
the way, both fixed here rather than at each call site:

- **The processor.** The Trainer saves the tokenizer only. `RunProcessor` loads the run's processor once (from a
  local folder or a hub name, through the hub cache) and writes it with `save_pretrained` into every folder the
  trainer saves, with the run's own tokenizer (which may have gained `[SEG]`): transformers 5's
  `processor_config.json`, and the `preprocessor_config.json` / `video_preprocessor_config.json` that readers on
  transformers 4.x look for. Where `AutoProcessor` cannot be
  built (no torchvision: transformers' video processors need it), the base's processor files are copied as they
  are, resolved the same way, and the log says so.
- **The tensor names.** transformers 5.23 records, on each model loaded by `from_pretrained`, the key renamings it
  applied, and `save_pretrained` reverts them. Under DeepSpeed ZeRO-3 the recorded list also holds the legacy
  renamings, among them `model.language_model.model -> model.language_model`, whose reversal writes the language
  model under `model.model.*` (measured: 50 tensors of a 2-rank run); transformers maps that back on load, vLLM
  and converters do not. `stock_layout(model)` saves with the renamings of a freshly built stock model instead,
  whatever path loaded it, and `drop_tied_aliases` leaves out the tied `lm_head.weight` that a gathered ZeRO state
  dict holds as a tensor of its own, so every back-end writes what `save_pretrained` of the stock class writes.
  `stock_weight_names(config)` says what that is (built on the meta device: free for a 7B model), and
  `check_stock_layout(folder)` compares a written folder with it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

# What `save_pretrained` of a Qwen VL processor writes besides the tokenizer files.
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.jinja", "chat_template.json")  # fmt: skip


class RunProcessor:
    """The processor of a run, written into every checkpoint folder the run saves.

    source: the base model's local folder or hub name (resolved like `from_pretrained`: hub cache, offline mode);
    tokenizer: the run's tokenizer object (saved in place of the processor's own, so added tokens are kept).
    """

    def __init__(self, source: str | Path, tokenizer=None):
        from transformers import AutoProcessor

        self.source, self.tokenizer = str(source), tokenizer
        try:
            self.processor = AutoProcessor.from_pretrained(self.source)
        except (ImportError, ModuleNotFoundError) as error:
            self.processor = None
            self.files = {name: path for name in PROCESSOR_FILES if (path := _resolve(self.source, name))}
            logger.warning(
                "AutoProcessor of %s cannot be built here (%s): checkpoints get its processor files copied as they "
                "are (%s)", self.source, error, ", ".join(self.files) or "none found",
            )  # fmt: skip
            return
        if tokenizer is not None:
            self.processor.tokenizer = tokenizer

    def save(self, output_dir: str | Path) -> None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.processor is not None:
            # processor_config.json (transformers >= 5), tokenizer, template; then the per-part files that readers
            # on transformers 4.x (vLLM and lmms-eval installs often pin it) open
            self.processor.save_pretrained(out)
            for part in ("image_processor", "video_processor"):
                if getattr(self.processor, part, None) is not None:
                    getattr(self.processor, part).save_pretrained(out)
            return
        for name, path in self.files.items():
            shutil.copyfile(path, out / name)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)


def _resolve(source: str, filename: str) -> str | None:
    """Local path of `filename` of a folder or a hub repository (through the hub cache), or None if it has none."""
    from transformers.utils import cached_file

    return cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)  # fmt: skip


@contextmanager
def stock_layout(model) -> Iterator[None]:
    """Within this block `save_pretrained` of `model` (a `PreTrainedModel`, unwrapped) writes the tensor names a
    freshly built stock model writes.

    transformers reverts the renamings recorded when the model was loaded (`_weight_conversions`). They are
    replaced here by the ones `save_pretrained` uses for a stock model built from its config (the class's own
    mapping without prefix changes), whatever path loaded the model and whatever wraps it: under FSDP2 the model's
    class is a generated subclass that transformers takes for custom code, and would save with no renaming at all.
    """
    missing = object()
    recorded = model.__dict__.get("_weight_conversions", missing)
    model._weight_conversions = stock_conversions(model.config)
    try:
        yield
    finally:
        if recorded is missing:
            del model._weight_conversions
        else:
            model._weight_conversions = recorded


def _meta_stock_model(config):
    """The stock class of `config`, built on the meta device (no memory, no initialisation)."""
    from transformers.modeling_utils import set_zero3_state

    from swim.modeling.families import family_of

    # set_zero3_state: inside a ZeRO-3 run, sub-models are otherwise built under `deepspeed.zero.Init`, whose
    # broadcasts would wait forever for the ranks that do not save.
    with torch.device("meta"), set_zero3_state():
        return family_of(config).stock_class(config)(config)


def stock_conversions(config) -> list:
    """The renamings `save_pretrained` reverts for a stock model of `config` that was not loaded from a file."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = get_model_conversion_mapping(_meta_stock_model(config), add_legacy=False)
    return [c for c in conversions if not isinstance(c, PrefixChange)]


def drop_tied_aliases(model, state_dict: dict) -> dict:
    """`state_dict` without the names under which `model` shares a parameter with an earlier one (`lm_head.weight`
    of a model with tied embeddings).

    `save_pretrained` finds tied weights by storage, which a gathered state dict (DeepSpeed ZeRO-2 / ZeRO-3 clones
    each tensor) no longer shares: the alias would be written as a tensor of its own, which the stock class does
    not write.
    """
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    aliases = every - {name for name, _ in model.named_parameters()}
    return {k: v for k, v in state_dict.items() if k not in aliases}


def stock_weight_names(config) -> set[str]:
    """The tensor names `save_pretrained` of the stock class writes for `config` (tied weights left out)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = _meta_stock_model(config)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return set(revert_weight_conversion(model, state))


def saved_weight_names(folder: str | Path) -> set[str]:
    """The tensor names of the safetensors weights in `folder` (one file or an index of shards)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    names: set[str] = set()
    for name in files:
        with safe_open(folder / name, "pt") as f:
            names.update(f.keys())
    return names


def check_stock_layout(folder: str | Path, config=None) -> None:
    """Raise if the weights in `folder` are not named as `save_pretrained` of the stock class names them."""
    from transformers import AutoConfig

    config = config if config is not None else AutoConfig.from_pretrained(folder)
    expected, saved = stock_weight_names(config), saved_weight_names(folder)
    if saved != expected:
        unexpected, missing = sorted(saved - expected), sorted(expected - saved)
        raise RuntimeError(
            f"{folder}: the weights are not in the stock layout of {config.model_type}: {len(unexpected)} unexpected "
            f"tensor names (e.g. {unexpected[:3]}), {len(missing)} missing (e.g. {missing[:3]}). Loaders keyed on the "
            "stock names (vLLM, converters) would not find them."
        )
