"""Tiny, randomly initialised checkpoints of every supported family for tests, the demo and benchmarks.

Nothing can be downloaded here, so we build the whole checkpoint offline: a byte-level BPE tokenizer with
Qwen's real special tokens (same strings, same order, so the ids are small), Qwen's pre-tokenizer regex and
the family's chat template; a config of the family's stock class with GQA, a few text layers and a 2-block
vision tower (Qwen3-VL: per-head q/k norms, interleaved M-RoPE, DeepStack; Qwen3-VL-MoE: 4 experts; Qwen3.5:
gated q, partial rotary, two linear-attention and two softmax layers); and the image/video processor configs.
The result loads offline with the stock classes and `AutoProcessor`::

    from swim.tiny import build_tiny_checkpoint
    path = build_tiny_checkpoint("/tmp/tiny", family="qwen3_vl")
    model = AutoModelForImageTextToText.from_pretrained(path)   # Qwen3VLForConditionalGeneration
    tokenizer = AutoTokenizer.from_pretrained(path)

CLI: ``swim tiny OUT_DIR [--family qwen2_5_vl|qwen2_vl|qwen3_vl|qwen3_vl_moe|qwen3_5] [--layers 4 --hidden 64 ...]``.

A tiny checkpoint can also be served under a hub name from an offline hub cache (`serve_from_hub_cache`, or
``swim tiny OUT --hub-cache CACHE --repo-id Qwen/Qwen2.5-VL-7B-Instruct``): with ``HF_HUB_CACHE=CACHE
HF_HUB_OFFLINE=1``, every tool that takes a hub name (``swim train --model_name_or_path Qwen/...``, transformers,
lmms-eval) then resolves it the way it resolves a real download, which is how the "trained from a hub name" paths
are tested without a network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from swim.data.control_tokens import QWEN_SPECIAL_TOKENS

logger = logging.getLogger(__name__)


# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2/Qwen2.5 models).
QWEN_PRETOKENIZE_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# The Qwen2-VL / Qwen2.5-VL chat template.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A Qwen3-VL-style chat template (written for these tiny checkpoints): the same rendered layout as Qwen3-VL's
# Instruct template for text, images and videos (the vision_start/pad/vision_end triplet), and, unlike Qwen2-VL's,
# no default system turn.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

FAMILY_NAMES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5")

# Words of the synthetic dataset and of common prompts, so that they are single tokens in the tiny vocab.
_CORPUS_WORDS = (
    "red green blue yellow purple orange white black circle square triangle star diamond cross "
    "left right up down stays still moves move moving toward towards the a an of in on at to from and is are "
    "which what where who how does do describe object objects shape shapes video frame frames first last "
    "answer option options letter choices given directly question questions color colour size small large "
    "man woman person dog cat car ball shirt wearing holding next behind front top bottom corner center "
    "You are Qwen, a helpful assistant with global scene understanding, capable of grounding user-specified "
    "text to the corresponding object instance in the image and providing fine-grained analysis based on "
    "visual evidence. Answer with the option's letter from the given choices directly. (A) (B) (C) (D) "
    "Please describe it in detail. It starts near then ends. There is one another same different."
)


def _corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = [_CORPUS_WORDS]
    # Every word with and without a leading space, and in sentence position, so BPE learns " word" tokens.
    lines += [f"the {w} and {w.capitalize()}." for w in words]
    lines += ["0 1 2 3 4 5 6 7 8 9 10 . , ! ? : ; ' \" ( ) [ ] - \n\n"]
    return lines


def build_tokenizer(vocab_size: int = 1000, chat_template: str = QWEN2_VL_CHAT_TEMPLATE):
    """A byte-level BPE tokenizer with Qwen's special tokens, pre-tokenizer and chat template.

    The special tokens get ids 0..13 in Qwen's order; `<|im_end|>` is EOS and `<|endoftext|>` is padding,
    as in Qwen2.5-VL-Instruct. Deterministic: the same corpus and settings give the same vocabulary.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        chat_template=chat_template,
        padding_side="right",
        model_max_length=32768,
    )


def tiny_config_dict(
    vocab_size: int,
    *,
    family: str = "qwen2_5_vl",
    num_hidden_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 32,
    tie_word_embeddings: bool = True,
) -> dict[str, Any]:
    """Keyword arguments of a tiny config of `family`'s stock class (GQA text model, 2-block vision tower)."""
    if family not in FAMILY_NAMES:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILY_NAMES)}")
    special = {name: i for i, name in enumerate(QWEN_SPECIAL_TOKENS)}
    head_dim = (
        hidden_size // num_attention_heads if family != "qwen3_5" else 2 * hidden_size // num_attention_heads
    )
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
    )
    vision = dict(
        depth=vision_depth,
        num_heads=2,
        out_hidden_size=hidden_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # Qwen's 7B split is [16, 24, 24] of 64 (chunked T/H/W frequency blocks): keep the 2:3:3 proportions.
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": _mrope(head_dim, 2),
        }
        vision.update(patch_size=14, in_chans=3)
        if family == "qwen2_vl":
            vision.update(embed_dim=vision_hidden_size, hidden_size=hidden_size, mlp_ratio=2)
            del vision["out_hidden_size"]
        else:
            vision.update(
                hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, window_size=112,
                fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2,
            )  # fmt: skip
    else:
        # Qwen3 families: per-head q/k norms, interleaved M-RoPE ([24, 20, 20] of 64 in the 8B model), patch 16.
        text["head_dim"] = head_dim
        rotary = head_dim if family != "qwen3_5" else head_dim // 4
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5e5,
            "mrope_section": _mrope(rotary, 3),
        }
        vision.update(
            patch_size=16, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
            num_position_embeddings=64, in_channels=3,
        )  # fmt: skip
        if family in ("qwen3_vl", "qwen3_vl_moe"):
            vision["deepstack_visual_indexes"] = list(range(min(vision_depth, num_hidden_layers)))
        if family == "qwen3_vl_moe":
            text.update(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size // 2,
                        decoder_sparse_step=1)  # fmt: skip
        if family == "qwen3_5":
            # hybrid: every other layer is Gated DeltaNet (linear attention), the rest gated softmax attention
            text["rope_parameters"]["partial_rotary_factor"] = 0.25
            text.update(
                layer_types=["linear_attention", "full_attention"] * (num_hidden_layers // 2),
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_conv_kernel_dim=4,
            )  # fmt: skip
    return dict(
        text_config=text,
        vision_config=vision,
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def _mrope(rotary_dim: int, style: int) -> list[int]:
    """M-RoPE sections (T, H, W) summing to `rotary_dim / 2`: 2:3:3 (Qwen2.5-VL, style 2) or 3:2.5:2.5 (Qwen3)."""
    half = rotary_dim // 2
    t = max(1, round(half * (2 / 8 if style == 2 else 24 / 64)))
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_config(vocab_size: int, family: str = "qwen2_5_vl", **overrides):
    """A tiny config object of `family`'s stock class."""
    import transformers

    from swim.modeling.families import family_of

    model_type = family
    spec = family_of(model_type)
    class_name = spec.stock_classes[model_type].replace("ForConditionalGeneration", "Config")
    return getattr(transformers, class_name)(**tiny_config_dict(vocab_size, family=family, **overrides))


def processor_configs(
    family: str = "qwen2_5_vl", min_pixels: int | None = None, max_pixels: int | None = None
):
    """Image and video processor configs in the layout of the family's checkpoints (small pixel budgets)."""
    from swim.modeling.families import family_of

    spec = family_of(family)
    factor = spec.geometry.factor
    return spec.processor_configs(min_pixels or (2 * factor) ** 2, max_pixels or factor * factor * 64)


def build_tiny_model(tokenizer=None, seed: int = 0, family: str = "qwen2_5_vl", **overrides):
    """A randomly initialised tiny model of `family`'s stock class (fp32)."""
    import torch

    from swim.modeling.families import family_of

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    vocab = overrides.pop("vocab_size", None) or _round_up(len(tokenizer), 64)
    config = tiny_config(vocab, family, **overrides)
    torch.manual_seed(seed)
    return family_of(config).stock_class(config)(config)


def build_tiny_checkpoint(
    out_dir: str | Path, seed: int = 0, family: str = "qwen2_5_vl", **overrides
) -> Path:
    """Write a tiny random checkpoint of `family` with tokenizer and processor files to `out_dir`.

    `overrides` go to `tiny_config_dict` (for example ``num_hidden_layers=8, hidden_size=128``). Returns the
    directory. Loadable offline by the stock `from_pretrained` of the model, tokenizer and (where
    torchvision is installed) `AutoProcessor`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = QWEN2_VL_CHAT_TEMPLATE if family in ("qwen2_vl", "qwen2_5_vl") else QWEN3_VL_CHAT_TEMPLATE
    tokenizer = build_tokenizer(chat_template=template)
    model = build_tiny_model(tokenizer, seed=seed, family=family, **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template)
    for name, cfg in processor_configs(family).items():
        (out / name).write_text(json.dumps(cfg, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "wrote tiny %s (%s, %.2f M params, vocab %d) to %s", family, type(model).__name__, n_params / 1e6,
        len(tokenizer), out,
    )  # fmt: skip
    return out


def serve_from_hub_cache(folder: str | Path, cache_dir: str | Path, repo_id: str) -> Path:
    """Put the files of `folder` into the hub cache `cache_dir` as revision `main` of model `repo_id`.

    The layout is the one `huggingface_hub` writes and reads (`models--ORG--NAME/blobs/<sha256>`,
    `snapshots/<commit>/<file>` -> relative links to the blobs, `refs/main` = the commit), so
    `from_pretrained(repo_id)` with `HF_HUB_CACHE=cache_dir HF_HUB_OFFLINE=1` finds them as a real download.
    The commit id is a hash of the files: serving the same checkpoint twice gives the same snapshot. Returns the
    snapshot folder.
    """
    folder, repo = Path(folder), Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    commit = hashlib.sha1(
        "".join(f"{p.relative_to(folder)}:{d}" for p, d in digests.items()).encode()
    ).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path, digest in digests.items():
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="swim tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILY_NAMES)
    parser.add_argument("--layers", dest="num_hidden_layers", type=int, default=4)
    parser.add_argument("--hidden", dest="hidden_size", type=int, default=64)
    parser.add_argument("--intermediate", dest="intermediate_size", type=int, default=128)
    parser.add_argument("--heads", dest="num_attention_heads", type=int, default=4)
    parser.add_argument("--kv-heads", dest="num_key_value_heads", type=int, default=2)
    parser.add_argument(
        "--hub-cache", help="also serve the checkpoint from this offline hub cache (HF_HUB_CACHE)"
    )
    parser.add_argument(
        "--repo-id",
        default="Qwen/Qwen2.5-VL-7B-Instruct",
        help="the hub name it is served under (--hub-cache)",
    )
    args = vars(parser.parse_args(argv))
    hub_cache, repo_id = args.pop("hub_cache"), args.pop("repo_id")
    out = build_tiny_checkpoint(args.pop("out_dir"), seed=args.pop("seed"), family=args.pop("family"), **args)
    logger.info("done: %s", out)
    if hub_cache:
        snapshot = serve_from_hub_cache(out, hub_cache, repo_id)
        logger.info("served as %s from %s (HF_HUB_CACHE=%s HF_HUB_OFFLINE=1)", repo_id, snapshot, hub_cache)
