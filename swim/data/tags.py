"""``<ins>…</ins>`` tags → token positions, through character offsets.

How it works (`build_text`):

1. Each turn's tags are parsed (`parse_tags`; unclosed, nested, stray or empty tags raise `TagError`) and
   replaced by private-use sentinel characters; each assistant answer is wrapped in two more sentinels.
2. The chat template is rendered (system prompt configurable; the video/image placeholder goes first in the
   first user turn). The sentinels pass through the template untouched, so removing them from the rendered
   string gives the clean text *and* the exact character range of every tagged span and every answer, for
   any template, without searching for the words (a tagged word that also occurs untagged, e.g. in the
   system prompt, is never confused with it).
3. The clean text is tokenized once with ``return_offsets_mapping=True``. A token belongs to a span if their
   character ranges overlap. Spans are first trimmed of surrounding whitespace, so with Qwen's byte-level
   BPE the token ``" dog"`` (whose offsets include the leading space) belongs to the span ``dog``, and a
   whitespace-only token never does; a word split into several tokens gives all of them.
4. Each ``<|video_pad|>`` / ``<|image_pad|>`` token is expanded at the id level to the family's layout
   (`swim.modeling.families.VisionSpan`): K contiguous vision tokens (Qwen2/2.5-VL, and images everywhere), or
   for a Qwen3-VL / Qwen3.5 video the whole ``<|vision_start|><|video_pad|><|vision_end|>`` triplet becomes, per
   temporal group, the text timestamp ``<t seconds>`` and its own vision_start / tokens / vision_end block
   (`expand_vision`, shared with the evaluation prompts). All positions are shifted accordingly.

Tokens that straddle a tag edge (``<ins>dog</ins>s`` -> `` dogs``; Chinese merges such as ``的女孩``) are
supervised whole, and counted (`TextSample.straddling`) so that datasets can report how often it happens.

Objects: the k-th distinct tagged phrase (order of first appearance in the rendered text, compared
case-insensitively after stripping) refers to ``annotation[k]``; every occurrence of a phrase (question and
answer, repeated) is supervised. If the number of distinct phrases differs from the number of objects, the
text is kept but attention supervision is dropped and a reason is returned (`TextSample.skip_reason`).

Which tokens are supervised is chosen by ``query`` (the recipe key ``attn_query``, `QUERY_SELECTORS`): the tagged
words (``tags``, SWIM), or, from the answer ranges that also give ``labels``, the last token of each assistant
answer (``answer_last``, KLAL) or all of its tokens (``answer_all``); a KLAL record needs no tags.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from swim.data.control_tokens import find_control_tokens
from swim.data.records import Turn
from swim.modeling.families import VisionSpan, timestamp_text

if TYPE_CHECKING:  # tensors only in `build_text`: `align_text` (the data checks) runs without torch
    import torch

OPEN_TAG, CLOSE_TAG = "<ins>", "</ins>"
_TAG_RE = re.compile(r"</?ins>")

SWIM_SYSTEM_PROMPT = (
    "You are Qwen, a helpful assistant with global scene understanding, capable of grounding user-specified "
    "text to the corresponding object instance in the image and providing fine-grained analysis based on "
    "visual evidence."
)

# Private-use code points: never produced by tokenizers' normalisers, never in real data (checked anyway).
_S_OPEN, _S_CLOSE, _S_ANS, _S_ANS_END = "\ue000", "\ue001", "\ue002", "\ue003"
_SENTINELS = (_S_OPEN, _S_CLOSE, _S_ANS, _S_ANS_END)

VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
TOKEN_TYPE = {"text": 0, "image": 1, "video": 2}


class TagError(ValueError):
    """Malformed ``<ins>`` tags (unclosed, nested, stray closing tag, empty)."""

    def __init__(self, reason: str, *, turn: int | None = None):
        self.reason, self.turn = reason, turn
        super().__init__(reason if turn is None else f"turn {turn}: {reason}")


@dataclass(frozen=True)
class TagSpan:
    """A tagged phrase: ``text[start:end] == phrase`` in the text with tags removed."""

    start: int
    end: int
    phrase: str


def parse_tags(text: str) -> tuple[str, list[TagSpan]]:
    """Remove ``<ins>``/``</ins>`` from ``text``; return the clean text and the tagged spans in order.

    Raises `TagError` for a nested or unclosed ``<ins>``, a ``</ins>`` without opening, or an empty tag.
    """
    clean: list[str] = []
    spans: list[TagSpan] = []
    n = 0  # length of the clean text so far
    open_at: int | None = None
    last = 0
    for m in _TAG_RE.finditer(text):
        clean.append(text[last : m.start()])
        n += m.start() - last
        last = m.end()
        if m.group() == OPEN_TAG:
            if open_at is not None:
                raise TagError(f"nested <ins> at character {m.start()}")
            open_at = n
        else:
            if open_at is None:
                raise TagError(f"</ins> without <ins> at character {m.start()}")
            phrase = "".join(clean)[open_at:n]
            if not phrase.strip():
                raise TagError(f"empty <ins></ins> at character {m.start()}")
            spans.append(TagSpan(open_at, n, phrase))
            open_at = None
    if open_at is not None:
        raise TagError("unclosed <ins>")
    clean.append(text[last:])
    return "".join(clean), spans


def strip_tags(text: str) -> str:
    """``text`` without ``<ins>`` tags (validated)."""
    return parse_tags(text)[0]


def normalize_phrase(phrase: str) -> str:
    return " ".join(phrase.split()).casefold()


def distinct_phrases(phrases: Sequence[str]) -> list[str]:
    """Normalised phrases in order of first appearance (case-insensitive, whitespace-stripped)."""
    seen: dict[str, None] = {}
    for p in phrases:
        seen.setdefault(normalize_phrase(p), None)
    return list(seen)


def assign_objects(phrases: Sequence[str], n_objects: int) -> tuple[list[int] | None, str | None]:
    """Object index of each tagged phrase occurrence, or ``(None, reason)`` on a count mismatch."""
    order = distinct_phrases(phrases)
    if len(order) != n_objects:
        return (
            None,
            f"tag/object count mismatch: {len(order)} distinct tagged phrase(s), {n_objects} object(s)",
        )
    index = {p: k for k, p in enumerate(order)}
    return [index[normalize_phrase(p)] for p in phrases], None


def check_turn_tags(turns: Sequence[Turn]) -> list[str]:
    """Parse every turn's tags (raises `TagError` naming the turn); return all tagged phrases in order."""
    phrases = []
    for t, turn in enumerate(turns):
        try:
            phrases += [s.phrase for s in parse_tags(turn.text)[1]]
        except TagError as e:
            raise TagError(e.reason, turn=t) from None
    return phrases


@dataclass
class TextSample:
    """Token-level text of one sample. Shapes: ``[L]`` for the three id tensors, ``[n_q]`` for the queries."""

    input_ids: torch.Tensor  # Long [L]
    labels: torch.Tensor  # Long [L], -100 outside assistant answers (+ their <|im_end|>)
    mm_token_type_ids: torch.Tensor  # Long [L], 0 text / 1 image / 2 video
    query_positions: torch.Tensor  # Long [n_q], sorted
    query_objects: torch.Tensor  # Long [n_q]
    skip_reason: str | None = None  # why attention supervision was dropped (None: supervised or text-only)
    text: str = ""  # the rendered clean text, with one pad token per image/video
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # (char start, end, phrase) per tag
    straddling: int = 0  # supervised tokens that extend beyond their tag (supervised whole)


@dataclass
class AlignedText:
    """`TextSample` as plain lists (`align_text`): what the data checks need, without importing torch."""

    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]
    query_positions: list[int]
    query_objects: list[int]
    skip_reason: str | None
    text: str
    spans: list[tuple[int, int, str]]
    straddling: int
    text_ids: list[int]  # the ids of ``text`` before the vision expansion
    offsets: list[tuple[int, int]]  # their character ranges in ``text``


def build_text(tokenizer, turns: Sequence[Turn], **options) -> TextSample:
    """Render, tokenize and align one conversation: `align_text` (same arguments), as tensors."""
    import torch

    a = align_text(tokenizer, turns, **options)
    return TextSample(
        input_ids=torch.tensor(a.input_ids, dtype=torch.long),
        labels=torch.tensor(a.labels, dtype=torch.long),
        mm_token_type_ids=torch.tensor(a.mm_token_type_ids, dtype=torch.long),
        query_positions=torch.tensor(a.query_positions, dtype=torch.long),
        query_objects=torch.tensor(a.query_objects, dtype=torch.long),
        skip_reason=a.skip_reason,
        text=a.text,
        spans=a.spans,
        straddling=a.straddling,
    )


def align_text(
    tokenizer,
    turns: Sequence[Turn],
    *,
    media: Sequence[VisionSpan | tuple[Literal["video", "image"], int]] = (),
    n_objects: int = 0,
    supervise: bool = True,
    system_prompt: str | None = SWIM_SYSTEM_PROMPT,
    query: str = "tags",
) -> AlignedText:
    """Render, tokenize and align one conversation (`build_text` gives the same as tensors).

    ``media`` lists one `VisionSpan` per image/video (or ``(kind, n_tokens)``: one contiguous run of K =
    ``t*h*w / merge**2`` tokens), placed at the start of the first user turn. ``query`` chooses the supervised
    tokens (`QUERY_SELECTORS`). With ``supervise=False`` or ``n_objects == 0`` no queries are produced (tags are
    still validated and removed). Raises `TagError`. Plain lists: the data checks run it without torch.
    """
    media = [m if isinstance(m, VisionSpan) else VisionSpan(m[0], m[1]) for m in media]
    phrases = check_turn_tags(turns)
    messages = _messages(turns, [m.kind for m in media], system_prompt)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    clean, tag_ranges, answer_ranges = _remove_sentinels(rendered)
    if len(tag_ranges) != len(phrases):  # the template dropped or duplicated content
        raise TagError(f"chat template changed the tag count ({len(phrases)} -> {len(tag_ranges)})")

    enc = tokenizer(clean, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]

    labelled = _tokens_starting_in(offsets, _with_im_end(clean, answer_ranges))
    queries: list[tuple[int, int]] = []  # (token position, object)
    skip_reason, straddling = None, 0
    if supervise and n_objects > 0:
        if query not in QUERY_SELECTORS:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {query!r}")
        aligned = Alignment(clean, offsets, tag_ranges, answer_ranges, phrases)
        queries, skip_reason, straddling = QUERY_SELECTORS[query](aligned, n_objects)

    new_ids, types, new_pos = expand_vision(tokenizer, ids, media)
    lab = [-100] * len(new_ids)
    for p in labelled:
        lab[new_pos[p]] = ids[p]
    queries.sort()
    return AlignedText(
        input_ids=new_ids,
        labels=lab,
        mm_token_type_ids=types,
        query_positions=[new_pos[p] for p, _ in queries],
        query_objects=[o for _, o in queries],
        skip_reason=skip_reason,
        text=clean,
        spans=[(s, e, clean[s:e]) for s, e in tag_ranges],
        straddling=straddling,
        text_ids=ids,
        offsets=offsets,
    )


@dataclass(frozen=True)
class Alignment:
    """One rendered conversation, as the query selectors see it: the clean text, each token's character range,
    the tagged spans' and the assistant answers' character ranges (answers without their end-of-turn token), and
    the tagged phrases in order."""

    text: str
    offsets: list[tuple[int, int]]
    tag_ranges: list[tuple[int, int]]
    answer_ranges: list[tuple[int, int]]
    phrases: list[str]


Queries = tuple[
    list[tuple[int, int]], str | None, int
]  # ((token, object) pairs, skip reason, straddling tokens)


def tag_queries(aligned: Alignment, n_objects: int) -> Queries:
    """SWIM: every token of every tagged phrase; the k-th distinct phrase is object k (a count mismatch drops the
    supervision, with a reason)."""
    if not aligned.phrases and n_objects:
        reason = (f"{n_objects} annotated object(s) but no <ins>-tagged phrase: tag each object's phrase, or train "
                  "answer-supervised (KLAL) records with attn_query: answer_last")  # fmt: skip
        return [], reason, 0
    objects, reason = assign_objects(aligned.phrases, n_objects)
    if objects is None:
        return [], reason, 0
    queries, straddling = [], 0
    for (s, e), obj in zip(aligned.tag_ranges, objects, strict=True):
        s, e = _trim(aligned.text, s, e)
        tokens = _tokens_overlapping(aligned.offsets, s, e)
        queries += [(p, obj) for p in tokens]
        straddling += sum(_straddles(aligned.text, *aligned.offsets[p], s, e) for p in tokens)
    return queries, None, straddling


def answer_queries(aligned: Alignment, n_objects: int, *, last: bool) -> Queries:
    """KLAL: the answer tokens (every content token of each assistant answer, or only its last one; never the
    end-of-turn token). The answer as a whole refers to every annotated object: each row is paired with each
    object, so a record with one object gives one (row, object) query per row."""
    rows = []
    for s, e in aligned.answer_ranges:
        tokens = sorted(_tokens_starting_in(aligned.offsets, [(s, e)]))
        tokens = [p for p in tokens if aligned.text[slice(*aligned.offsets[p])].strip()]
        rows += tokens[-1:] if last else tokens
    return [(p, k) for p in rows for k in range(n_objects)], None, 0


# attn_query: how the supervised rows are chosen; each selector maps an `Alignment` to (token, object) queries.
QUERY_SELECTORS: dict[str, Callable[[Alignment, int], Queries]] = {
    "tags": tag_queries,
    "answer_last": functools.partial(answer_queries, last=True),
    "answer_all": functools.partial(answer_queries, last=False),
}
QUERY_MODES = tuple(QUERY_SELECTORS)


def expand_vision(
    tokenizer, ids: Sequence[int], media: Sequence[VisionSpan]
) -> tuple[list[int], list[int], list[int]]:
    """Replace each image/video placeholder of `ids` by its tokens; returns (ids, mm_token_type_ids, new_pos).

    A contiguous span replaces its pad token by K copies (types 1 image / 2 video). A timestamped video span
    replaces the whole ``<|vision_start|><|video_pad|><|vision_end|>`` triplet by, per temporal group, the tokens
    of ``<t seconds>`` (tokenized on their own: special tokens bound them, so this equals tokenizing in
    context), ``<|vision_start|>``, the group's video tokens and ``<|vision_end|>``; only the video tokens have
    type 2. `new_pos[p]` is the new position of old token p (for replaced tokens: the start of the replacement).
    Raises `TagError` if the placeholders do not match `media`.
    """
    pad_ids = {
        kind: tokenizer.convert_tokens_to_ids(tok)
        for kind, tok in (("video", VIDEO_PAD), ("image", IMAGE_PAD))
    }
    start_id, end_id = (tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END))
    pads = [p for p, t in enumerate(ids) if t in pad_ids.values()]
    if len(pads) != len(media) or any(ids[p] != pad_ids[m.kind] for p, m in zip(pads, media)):
        found = {kind: sum(ids[p] == i for p in pads) for kind, i in pad_ids.items()}
        raise TagError(
            f"expected {len(media)} vision placeholder(s) ({', '.join(m.kind for m in media) or 'none'}) in the "
            f"rendered text, found {found['video']} video and {found['image']} image placeholder(s)"
        )
    replacements: dict[int, tuple[int, list[int], list[int]]] = {}  # first old position -> (end, ids, types)
    for p, span in zip(pads, media):
        kind_type = TOKEN_TYPE[span.kind]
        if span.timestamps is None:
            replacements[p] = (p + 1, [ids[p]] * span.num_tokens, [kind_type] * span.num_tokens)
            continue
        if not (0 < p < len(ids) - 1 and ids[p - 1] == start_id and ids[p + 1] == end_id):
            raise TagError(f"the {span.kind} placeholder is not wrapped in {VISION_START}{VISION_END}")
        block_ids, block_types = [], []
        for seconds in span.timestamps:
            stamp = tokenizer(timestamp_text(seconds), add_special_tokens=False)["input_ids"]
            block_ids += [*stamp, start_id] + [ids[p]] * span.tokens_per_group + [end_id]
            block_types += [0] * (len(stamp) + 1) + [kind_type] * span.tokens_per_group + [0]
        replacements[p - 1] = (p + 2, block_ids, block_types)
    new_ids: list[int] = []
    types: list[int] = []
    new_pos: list[int] = []
    p = 0
    while p < len(ids):
        if p in replacements:
            end, block_ids, block_types = replacements[p]
            new_pos += [len(new_ids)] * (end - p)
            new_ids += block_ids
            types += block_types
            p = end
        else:
            new_pos.append(len(new_ids))
            new_ids.append(ids[p])
            types.append(0)
            p += 1
    return new_ids, types, new_pos


# ----------------------------------------------------------------------------------------------------------


def _messages(turns: Sequence[Turn], media: Sequence[str], system_prompt: str | None) -> list[dict]:
    msgs: list[dict] = []
    if system_prompt is not None:
        msgs.append({"role": "system", "content": system_prompt})
    first_user = True
    for t, turn in enumerate(turns):
        text = turn.text
        if any(s in text for s in _SENTINELS):
            raise TagError("text contains reserved private-use characters U+E000..U+E003", turn=t)
        if control := find_control_tokens(strip_tags(text)):
            raise TagError(
                f"contains Qwen control token(s) {', '.join(map(repr, control))}, which the tokenizer would read as "
                "control tokens, not text",
                turn=t,
            )
        text = text.replace(OPEN_TAG, _S_OPEN).replace(CLOSE_TAG, _S_CLOSE)
        if turn.role == "assistant":
            msgs.append({"role": "assistant", "content": _S_ANS + text + _S_ANS_END})
        elif first_user and media:
            content = [{"type": kind, kind: ""} for kind in media] + [{"type": "text", "text": text}]
            msgs.append({"role": "user", "content": content})
            first_user = False
        else:
            msgs.append({"role": "user", "content": text})
            first_user = False
    return msgs


def _remove_sentinels(rendered: str) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """Clean text, tag char ranges and answer char ranges (in the clean text)."""
    out: list[str] = []
    n = 0
    tags, answers = [], []
    tag_open = ans_open = None
    for ch in rendered:
        if ch == _S_OPEN:
            tag_open = n
        elif ch == _S_CLOSE:
            tags.append((tag_open, n))
        elif ch == _S_ANS:
            ans_open = n
        elif ch == _S_ANS_END:
            answers.append((ans_open, n))
        else:
            out.append(ch)
            n += 1
    return "".join(out), tags, answers


def _with_im_end(text: str, ranges: list[tuple[int, int]], end_token: str = "<|im_end|>"):
    """Extend each answer range over the end-of-turn token that follows it (it is a training target)."""
    return [(s, e + len(end_token) if text.startswith(end_token, e) else e) for s, e in ranges]


def _trim(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _straddles(text: str, a: int, b: int, s: int, e: int) -> bool:
    """Does token `text[a:b]` carry non-space characters outside the tag `text[s:e]`?"""
    return bool(text[a:s].strip()) or bool(text[e:b].strip())


def _tokens_overlapping(offsets: list[tuple[int, int]], s: int, e: int) -> list[int]:
    return [p for p, (a, b) in enumerate(offsets) if a < e and b > s and b > a]


def _tokens_starting_in(offsets: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> set[int]:
    return {p for p, (a, b) in enumerate(offsets) if b > a and any(s <= a < e for s, e in ranges)}
