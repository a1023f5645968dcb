"""What "a checkpoint every tool loads" means, as checks shared by the training tests of every back-end.

`assert_stock_checkpoint(folder)`:
1. the weights carry exactly the tensor names `save_pretrained` of the stock class writes (`swim.checkpoint`);
2. a stand-in for vLLM's weight loader finds every tensor: the checkpoint names go through the family's
   `hf_to_vllm_mapper` prefixes (copied from vLLM's model files, below) and must equal the parameter names of vLLM's
   module, which are the stock in-memory names under vLLM's own prefixes — a name no prefix fixes (the ZeRO-3
   `model.model.*` layout becomes `language_model.model.model.*`) is unknown to vLLM;
3. `AutoProcessor.from_pretrained(folder)` plus the stock class process a video and generate (the path of
   transformers' quick-start, lmms-eval's `qwen2_5_vl` model and every other stock tool).

`hub_environment(cache)`: the environment of a subprocess that resolves hub names from an offline hub cache
(`swim tiny --hub-cache`, `swim.tiny.serve_from_hub_cache`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoProcessor

from swim.checkpoint import check_stock_layout, saved_weight_names
from swim.modeling.model import stock_model_class

HUB_NAME = (
    "Qwen/Qwen2.5-VL-7B-Instruct"  # the paper's base model, served by the offline hub cache in the tests
)

# vLLM's `hf_to_vllm_mapper.orig_to_new_prefix`, first match wins (vllm/model_executor/models/qwen2_5_vl.py and
# qwen2_vl.py: new transformers names first, then the original checkpoint's; qwen3_vl.py: new names only). Read
# from vLLM's source, not installed here (it needs CUDA): a stand-in for its loader's name resolution only.
VLLM_PREFIXES = {
    "qwen2_5_vl": {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                   "lm_head.": "language_model.lm_head.", "model.": "language_model.model."},
    "qwen2_vl": {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                 "lm_head.": "language_model.lm_head.", "model.": "language_model.model."},
    "qwen3_vl": {"model.visual.": "visual.", "lm_head.": "language_model.lm_head.",
                 "model.language_model.": "language_model.model."},
}  # fmt: skip
# qwen3_vl_moe.py, qwen3_5.py: the same prefixes as Qwen3-VL (experts are then matched by vLLM's MoE loader).
for _model_type in ("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
    VLLM_PREFIXES[_model_type] = VLLM_PREFIXES["qwen3_vl"]
# Where vLLM's module keeps each part of the stock (in-memory) model.
VLLM_MODULES = {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                "lm_head.": "language_model.lm_head."}  # fmt: skip


def hub_environment(cache: str | Path) -> dict[str, str]:
    """`os.environ` for a subprocess that resolves hub names from `cache` without a network."""
    return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _rename(name: str, prefixes: dict[str, str]) -> str | None:
    for old, new in prefixes.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def vllm_missing_and_unknown(folder: str | Path) -> tuple[set[str], set[str]]:
    """(vLLM parameters no checkpoint tensor fills, checkpoint tensors vLLM has no parameter for)."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = stock_model_class(config)(config)
    tied = config.get_text_config().tie_word_embeddings
    expected = {
        _rename(n, VLLM_MODULES) for n in model.state_dict() if not (tied and n.startswith("lm_head."))
    }
    loaded = {_rename(n, VLLM_PREFIXES[config.model_type]) or n for n in saved_weight_names(folder)}
    return expected - loaded, loaded - expected


def assert_stock_checkpoint(folder: str | Path, generate: bool = True) -> None:
    folder = Path(folder)
    check_stock_layout(folder)
    missing, unknown = vllm_missing_and_unknown(folder)
    assert not missing and not unknown, (folder, sorted(missing)[:3], sorted(unknown)[:3])
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.chat_template and processor.video_processor is not None
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja"):
        assert (folder / name).exists(), f"{folder} has no {name} (transformers 4.x readers need it)"
    if not generate:
        return
    model = stock_model_class(str(folder)).from_pretrained(folder).eval()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    inputs = processor(text=[prompt], videos=[frames], return_tensors="pt", **_video_kwargs(processor))
    assert (inputs["input_ids"] == model.config.video_token_id).sum() > 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def _video_kwargs(processor) -> dict:
    """Qwen3-VL's processor writes per-frame timestamps: it needs the frames' metadata."""
    if "Qwen3" not in type(processor).__name__:
        return {}
    from transformers.video_utils import VideoMetadata

    return {"video_metadata": [VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])]}
