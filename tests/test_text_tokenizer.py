"""`TextTokenizer` (no torch) renders, tokenizes and aligns exactly as transformers' `AutoTokenizer`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from swim.data.records import Turn
from swim.data.tags import align_text
from swim.data.text_tokenizer import TextTokenizer

TURNS = [
    (
        Turn("user", "Describe the small lion <ins>cub</ins> and the <ins>man</ins> in red."),
        Turn(
            "assistant",
            "The <ins>cub</ins> rests; the <ins>man</ins> waves. 你好 <ins>女孩</ins>！ \\u00e9t\\u00e9",
        ),
    ),  # fmt: skip
    (
        Turn("user", "What is the <ins>dog</ins>s' owner doing?"),
        Turn("assistant", "Walking the <ins>dog</ins>."),
    ),
]


def pairs(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path), TextTokenizer.from_pretrained(path)


@pytest.mark.parametrize("media", [[("video", 4)], [("image", 2), ("video", 3)], []])
def test_same_alignment_as_autotokenizer_on_the_real_qwen_tokenizer(qwen_tokenizer_dir, media):
    auto, text = pairs(qwen_tokenizer_dir)
    for turns in TURNS:
        assert align_text(text, turns, media=media, n_objects=2) == align_text(
            auto, turns, media=media, n_objects=2
        )
    sample = "  the <|im_start|> x\\n\\n  y"
    assert text(sample, return_offsets_mapping=True) == {
        k: [tuple(o) for o in v] if k == "offset_mapping" else v
        for k, v in auto(sample, add_special_tokens=False, return_offsets_mapping=True).items()
        if k in ("input_ids", "offset_mapping")
    }


def test_same_rendering_for_every_family(family_ckpt):
    auto, text = pairs(family_ckpt)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "video", "video": ""},
                {"type": "text", "text": "Q?"}]}, {"role": "assistant", "content": "A."}]  # fmt: skip
    for generation in (False, True):
        assert text.apply_chat_template(
            messages, add_generation_prompt=generation
        ) == auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    for turns in TURNS:
        assert align_text(text, turns, media=[("video", 4)], n_objects=2) == align_text(
            auto, turns, media=[("video", 4)], n_objects=2
        )


def test_the_data_checks_do_not_import_torch(qwen_tokenizer_dir):
    code = (
        "import sys; from swim.data.nl_refer import build, raw, checks, synonyms; from swim.data import video, tags; "
        f"from swim.data.text_tokenizer import TextTokenizer; TextTokenizer.from_pretrained({str(qwen_tokenizer_dir)!r}); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
