"""Tiny, randomly initialised Qwen2.5-VL checkpoints for tests, the demo and benchmarks.

Nothing can be downloaded here, so we build the whole checkpoint offline: a byte-level BPE tokenizer with
Qwen's real special tokens (same strings, same order, so the ids are small), Qwen's pre-tokenizer regex and
the Qwen2-VL chat template; a `Qwen2_5_VLConfig` with GQA, a few text layers and a 2-block vision tower; and
the image/video processor configs. The result loads offline with the stock classes::

    from swim.tiny import build_tiny_checkpoint
    path = build_tiny_checkpoint("/tmp/tiny")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

CLI: ``swim tiny OUT_DIR [--layers 4 --hidden 64 ...]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Qwen2.5's special tokens, in Qwen's order (the real ids start at 151643; here they start at 0).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

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


def build_tokenizer(vocab_size: int = 1000):
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
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=32768,
    )


def tiny_config_dict(
    vocab_size: int,
    *,
    num_hidden_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 32,
    tie_word_embeddings: bool = True,
) -> dict[str, Any]:
    """Keyword arguments of a tiny `Qwen2_5_VLConfig` (GQA text model, 2-block windowed vision tower)."""
    head_dim = hidden_size // num_attention_heads
    half = head_dim // 2
    # Qwen's 7B split is [16, 24, 24] of 64: keep the same 2:3:3 proportions.
    t = max(1, round(half * 2 / 8))
    h = (half - t) // 2
    mrope_section = [t, h, half - t - h]
    special = {name: i for i, name in enumerate(QWEN_SPECIAL_TOKENS)}
    return dict(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=special["<|endoftext|>"],
            eos_token_id=special["<|im_end|>"],
            pad_token_id=special["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_heads=2,
            out_hidden_size=hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
            tokens_per_second=2,
            in_chans=3,
        ),
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def processor_configs(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 64) -> dict[str, dict]:
    """Image and video processor configs in the layout of Qwen2.5-VL checkpoints (small pixel budgets)."""
    common = dict(
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        merge_size=2,
        patch_size=14,
        temporal_patch_size=2,
        resample=3,
        rescale_factor=1 / 255,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    return {
        "preprocessor_config.json": dict(
            common, image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor"
        ),
        "video_preprocessor_config.json": dict(
            common, video_processor_type="Qwen2VLVideoProcessor", processor_class="Qwen2_5_VLProcessor"
        ),
    }


def build_tiny_model(tokenizer=None, seed: int = 0, **overrides):
    """A randomly initialised tiny `Qwen2_5_VLForConditionalGeneration` (fp32, eval mode off)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    vocab = overrides.pop("vocab_size", None) or _round_up(len(tokenizer), 64)
    config = Qwen2_5_VLConfig(**tiny_config_dict(vocab, **overrides))
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint with tokenizer and processor files to `out_dir`.

    `overrides` go to `tiny_config_dict` (for example ``num_hidden_layers=8, hidden_size=128``). Returns the
    directory. Loadable offline by the stock `from_pretrained` of the model, tokenizer and (where
    torchvision is installed) `AutoProcessor`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    for name, cfg in processor_configs().items():
        (out / name).write_text(json.dumps(cfg, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote tiny Qwen2.5-VL (%.2f M params, vocab %d) to %s", n_params / 1e6, len(tokenizer), out)
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="swim tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", dest="num_hidden_layers", type=int, default=4)
    parser.add_argument("--hidden", dest="hidden_size", type=int, default=64)
    parser.add_argument("--intermediate", dest="intermediate_size", type=int, default=128)
    parser.add_argument("--heads", dest="num_attention_heads", type=int, default=4)
    parser.add_argument("--kv-heads", dest="num_key_value_heads", type=int, default=2)
    args = vars(parser.parse_args(argv))
    out = build_tiny_checkpoint(args.pop("out_dir"), seed=args.pop("seed"), **args)
    logger.info("done: %s", out)
