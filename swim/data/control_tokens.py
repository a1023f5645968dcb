"""Qwen control-token strings (``<|im_end|>``, ``<|video_pad|>``, ``<tool_call>``, ...) in record text.

Why: Qwen's tokenizer matches its 22 added tokens anywhere in the text it is given (``split_special_tokens``
is false, in the stock processor too), so such a string in a question or an answer does not stay text: it
silently becomes the control token. A literal ``<|vision_end|>`` gives the model an extra vision end, a
literal ``<|im_end|>`` in an answer is trained as an end of turn in mid-answer, and a literal
``<|video_pad|>`` / ``<|image_pad|>`` adds a vision pad that no video fills (`swim.data.tags.build_text`
then finds more pads than media). Real data should never contain them; `find_control_tokens` lets
``swim validate`` (and `build_text`'s error message) name the turn that does.
"""

from __future__ import annotations

import re

# Qwen2.5's special tokens, in Qwen's order (the real ids start at 151643; `swim.tiny` numbers them from 0).
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

# All 22 added tokens of Qwen2.5 / Qwen2.5-VL, in id order (151643 + i): the 14 special tokens, then the
# tool-call and fill-in-the-middle tokens (not "special", but matched in text all the same).
QWEN_CONTROL_TOKENS: tuple[str, ...] = (
    *QWEN_SPECIAL_TOKENS,
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

_CONTROL_TOKEN_RE = re.compile("|".join(re.escape(t) for t in QWEN_CONTROL_TOKENS))


def find_control_tokens(text: str) -> list[str]:
    """The Qwen control-token strings that occur in ``text``, each once, in order of first occurrence.

    >>> find_control_tokens("a <|im_end|> b <|video_pad|> <|im_end|>")
    ['<|im_end|>', '<|video_pad|>']
    """
    return list(dict.fromkeys(m.group() for m in _CONTROL_TOKEN_RE.finditer(text)))
