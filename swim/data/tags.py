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
4. Each ``<|video_pad|>`` / ``<|image_pad|>`` token is expanded to the sample's K vision tokens at the id
   level (identical to tokenizing K copies, without tokenizing K copies) and all positions are shifted.

Objects: the k-th distinct tagged phrase (order of first appearance in the rendered text, compared
case-insensitively after stripping) refers to ``annotation[k]``; every occurrence of a phrase (question and
answer, repeated) is supervised. If the number of distinct phrases differs from the number of objects, the
text is kept but attention supervision is dropped and a reason is returned (`TextSample.skip_reason`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from swim.data.records import Turn

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


def build_text(
    tokenizer,
    turns: Sequence[Turn],
    *,
    media: Sequence[tuple[Literal["video", "image"], int]] = (),
    n_objects: int = 0,
    supervise: bool = True,
    system_prompt: str | None = SWIM_SYSTEM_PROMPT,
) -> TextSample:
    """Render, tokenize and align one conversation.

    ``media`` lists ``(kind, n_tokens)`` per image/video, placed at the start of the first user turn;
    ``n_tokens`` is the merged token count K (``t*h*w / merge**2``). With ``supervise=False`` or
    ``n_objects == 0`` no queries are produced (tags are still validated and removed). Raises `TagError`.
    """
    phrases = check_turn_tags(turns)
    messages = _messages(turns, media, system_prompt)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    clean, tag_ranges, answer_ranges = _remove_sentinels(rendered)
    if len(tag_ranges) != len(phrases):  # the template dropped or duplicated content
        raise TagError(f"chat template changed the tag count ({len(phrases)} -> {len(tag_ranges)})")

    enc = tokenizer(clean, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]

    labelled = _tokens_starting_in(offsets, _with_im_end(clean, answer_ranges))
    queries: list[tuple[int, int]] = []  # (token position, object)
    skip_reason = None
    if supervise and n_objects > 0:
        objects, skip_reason = assign_objects(phrases, n_objects)
        if objects is not None:
            for (s, e), obj in zip(tag_ranges, objects, strict=True):
                s, e = _trim(clean, s, e)
                queries += [(p, obj) for p in _tokens_overlapping(offsets, s, e)]

    # Expand the vision pads: old position p -> new position p + shift(p).
    pad_ids = {
        "video": tokenizer.convert_tokens_to_ids(VIDEO_PAD),
        "image": tokenizer.convert_tokens_to_ids(IMAGE_PAD),
    }
    pads = [p for p, t in enumerate(ids) if t in pad_ids.values()]
    if len(pads) != len(media) or any(
        ids[p] != pad_ids[kind] for p, (kind, _) in zip(pads, media, strict=True)
    ):
        raise TagError(f"expected {len(media)} vision pad token(s) in the rendered text, found {len(pads)}")
    new_ids, types, lab, new_pos = [], [], [], []
    it = iter(media)
    pad_set = set(pads)
    for p, t in enumerate(ids):
        new_pos.append(len(new_ids))
        if p in pad_set:
            kind, k = next(it)
            new_ids += [t] * k
            types += [TOKEN_TYPE[kind]] * k
            lab += [-100] * k
        else:
            new_ids.append(t)
            types.append(0)
            lab.append(t if p in labelled else -100)
    queries.sort()
    return TextSample(
        input_ids=torch.tensor(new_ids, dtype=torch.long),
        labels=torch.tensor(lab, dtype=torch.long),
        mm_token_type_ids=torch.tensor(types, dtype=torch.long),
        query_positions=torch.tensor([new_pos[p] for p, _ in queries], dtype=torch.long),
        query_objects=torch.tensor([o for _, o in queries], dtype=torch.long),
        skip_reason=skip_reason,
        text=clean,
        spans=[(s, e, clean[s:e]) for s, e in tag_ranges],
    )


# ----------------------------------------------------------------------------------------------------------


def _messages(turns: Sequence[Turn], media, system_prompt: str | None) -> list[dict]:
    msgs: list[dict] = []
    if system_prompt is not None:
        msgs.append({"role": "system", "content": system_prompt})
    first_user = True
    for turn in turns:
        text = turn.text
        if any(s in text for s in _SENTINELS):
            raise TagError("text contains reserved private-use characters U+E000..U+E003")
        text = text.replace(OPEN_TAG, _S_OPEN).replace(CLOSE_TAG, _S_CLOSE)
        if turn.role == "assistant":
            msgs.append({"role": "assistant", "content": _S_ANS + text + _S_ANS_END})
        elif first_user and media:
            content = [{"type": kind, kind: ""} for kind, _ in media] + [{"type": "text", "text": text}]
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


def _tokens_overlapping(offsets: list[tuple[int, int]], s: int, e: int) -> list[int]:
    return [p for p, (a, b) in enumerate(offsets) if a < e and b > s and b > a]


def _tokens_starting_in(offsets: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> set[int]:
    return {p for p, (a, b) in enumerate(offsets) if b > a and any(s <= a < e for s, e in ranges)}
