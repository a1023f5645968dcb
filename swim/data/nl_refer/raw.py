"""The raw VideoRefer-700K / VideoRefer-Bench record layer of NL-Refer construction (``swim data build``).

Reads the released files record by record (`swim.data.json_stream`: the 700K files are multi-GB JSON arrays),
parses the visual-prompt placeholders into a structured list of object mentions, checks the invariants the
rewrite relies on, and writes the deterministic "format" step (`formatted`) that the LLM rewrite starts from.

Kinds (``KINDS``) and their text fields:

- ``detailed`` / ``short`` / ``qa`` (VideoRefer-700K): ``conversations`` = one human turn (``"<video>\\n..."``
  or ``"...\\n<video>"``) and one gpt turn; ``question`` is the human turn without the ``<video>``
  placeholder, ``answer`` the gpt turn verbatim.
- ``bench_d`` (VideoRefer-Bench-D): ``caption`` only; the question is `BENCH_D_SOURCE_QUESTION` (one
  ``<region>``), the answer is the caption.
- ``bench_q`` (VideoRefer-Bench-Q): ``Question`` / ``options`` / ``Answer`` (+ ``type``).

Placeholder grammar (`parse_placeholders`), scanned left to right:

- introduction of object N with its mask slot: ``<objectN><region>``, ``<objectN> <region>``,
  ``<objectN> [<region>]`` (spaces or tabs between the two parts);
- introduction of an unnamed object: a bare ``<region>`` (or ``[<region>]``);
- back-reference to an introduced object: a bare ``<objectN>`` (anywhere in the question or the answer, also
  before its introduction);
- anything else that looks like a placeholder (``<object>``, ``<objectA>``, ``<Region >``) is malformed.

Invariants (each violation has a reason code, listed in ``CODES``):

- the k-th introduction in the question (order of appearance) owns ``annotation[k]``; the number ``N`` of
  ``<objectN>`` is only a name (Bench-Q uses ``<object3>`` for ``annotation[0]``). Hence the number of
  introductions equals ``len(annotation)``, names are unique, every back-reference names an introduced
  object, and the answer holds back-references only (a ``<region>`` there has no mask slot);
- annotation keys are frame indices written as non-negative integer strings, inside the video; every
  segmentation decodes (compressed RLE, uncompressed RLE, polygons — with the record's ``height``/``width``
  or else the video's size — or ``null``, "not annotated on this frame") to the video's frame size, and every
  object has at least one non-empty mask;
- 1 to ``max_objects`` objects per record (default 5, the limit UniPixel applies to the same files: more
  objects make prompts that neither the rewrite nor the model handles reliably).

Index rule (`make_index`): ``videorefer_<subset>_<tag>_<position>`` with ``<subset>`` from `SUBSET_NAMES`,
``<tag>`` = the first 8 hex digits of the SHA-1 of the input file's *name* (not its folder, so moving the
data keeps the indices) and ``<position>`` the 0-based position of the record in that file. SWIM's loader
dispatches on substrings of ``index``: ``"videorefer"`` selects the VideoRefer path and ``"qa"`` makes a record
text-only. So the index must contain ``"qa"`` exactly for QA: the subset names other than ``qa`` do not
contain it, hex digits have no ``q`` and the parts are joined by ``_``, so neither the tag nor the position can
introduce it — which a file stem (``"videorefer-qa-75k"``, ``"squad"``) could. Same file name and position,
same index; two input files with the same name and kind would collide, so keep their names distinct.

Why: the rewrite must replace every placeholder by natural language while SWIM maps the k-th tagged word to
``annotation[k]``, so the mapping placeholder -> annotation index has to be exact before any LLM sees the
text, and a record that breaks it (or whose masks do not fit its video) is worth nothing for attention
supervision — it is reported with a reason code instead of being sent.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from swim.data.json_stream import iter_json_records
from swim.data.masks import MaskDecodeError, decode_segmentation, encode_mask
from swim.data.records import GPT_ROLES, HUMAN_ROLES, RecordError, strip_media_placeholder
from swim.data.video import VideoInfo, probe_video

logger = logging.getLogger(__name__)

KINDS = ("detailed", "short", "qa", "bench_d", "bench_q")
SUBSET_NAMES = {
    "detailed": "detailed_caption",
    "short": "short_caption",
    "qa": "qa",
    "bench_d": "bench_d",
    "bench_q": "bench_q",
}
TRAIN_KINDS = ("detailed", "short", "qa")  # VideoRefer-700K: conversations
# Bench-D has no question: this is the source question handed to the LLM (VideoRefer's evaluator asks the same)
BENCH_D_SOURCE_QUESTION = "Please give a detailed description of <region> in the video."
DEFAULT_MAX_OBJECTS = 5  # UniPixel drops VideoRefer records with more objects

# Reason codes of input problems (`InputProblem.codes`, `RawRecordError.codes`, `check_raw`).
CODES = {
    "turns": "text fields: not exactly one human + one gpt turn (700K), missing Question/options/Answer "
    "(Bench-Q) or caption (Bench-D)",
    "shape": "the record or a field has the wrong JSON type (not an object, no video, annotation not a list...)",
    "json": "the record could not be read as JSON (a bad .jsonl line, or a syntax error in the array)",
    "placeholder_count": "number of introductions != len(annotation), an introduction in the answer, or a "
    "malformed <region>",
    "unknown_object": "a back-reference <objectN> never introduced, or a malformed <object...> placeholder",
    "duplicate_object": "the same <objectN> introduced twice",
    "options_placeholder": "a Bench-Q option contains a placeholder (options are kept verbatim)",
    "no_objects": "no object (empty annotation)",
    "too_many_objects": "more than max_objects objects",
    "frame_key": "an annotation key (or frame_idx) is not a non-negative integer",
    "mask_decode": "a segmentation cannot be decoded",
    "mask_size": "a mask (or the record's height/width) does not match the video frame size",
    "empty_masks": "an object has no non-empty mask on any frame",
    "missing_video": "the video file or frame folder does not exist",
    "unreadable_video": "the video cannot be probed",
    "frame_range": "an annotated frame (or frame_idx) is beyond the video's last frame",
}

_PLACEHOLDER = re.compile(
    r"<object(?P<intro>\d+)>[ \t]*(?:\[<region>\]|<region>)"  # <object3><region>, <object0> [<region>]
    r"|(?P<bare>\[<region>\]|<region>)"  # an unnamed introduction
    r"|<object(?P<ref>\d+)>"  # a back-reference
    r"|(?P<bad>(?i:<\s*/?\s*(?:object|region)[^<>]*>))"  # leftovers: <object>, <objectA>, <Region >
)
_FRAME_KEY = re.compile(r"\d+")


class RawRecordError(ValueError):
    """`read_raw` found structural problems: parallel tuples of reason codes and human-readable reasons."""

    def __init__(self, codes: Sequence[str], reasons: Sequence[str]):
        self.codes = tuple(codes)
        self.reasons = tuple(reasons)
        super().__init__("; ".join(f"{c}: {r}" for c, r in zip(self.codes, self.reasons)))

    def __reduce__(self):
        return (RawRecordError, (self.codes, self.reasons))


@dataclass(frozen=True)
class Placeholder:
    """One placeholder found by `parse_placeholders`; ``start:end`` is its span in the text."""

    turn: str
    start: int
    end: int
    text: str
    object_id: int | None  # N of <objectN>; None for a bare <region> or a malformed placeholder
    intro: bool  # an introduction (owns the next annotation entry)
    malformed: bool = False


@dataclass(frozen=True)
class Mention:
    """A placeholder resolved to its object: ``object`` is the annotation index k."""

    object: int
    object_id: int | None  # N of <objectN>; None for a bare <region>
    turn: str  # "question" or "answer"
    start: int  # span of the placeholder text in that turn's text (RawRecord.question / .answer)
    end: int
    intro: bool  # True: an introduction (<objectN><region> forms, bare <region>); False: a back-reference


@dataclass(frozen=True)
class RawRecord:
    kind: str
    source: str  # the input file
    position: int  # 0-based position in that file
    index: str  # `make_index`
    id: Any  # the file's own "id" (None if absent)
    video: str  # absolute path
    question: str  # human turn without <video> (Bench-Q: Question; Bench-D: BENCH_D_SOURCE_QUESTION)
    answer: str  # gpt turn (Bench-D: caption; Bench-Q: Answer)
    n_objects: int
    mentions: tuple[Mention, ...]  # question mentions then answer mentions, each in text order
    obj: dict  # the original JSON object, untouched
    video_info: VideoInfo | None = None  # set by `iter_raw` when it probed the video

    def object_ids(self) -> list[int | None]:
        """N of ``<objectN>`` per annotation index (None for a bare ``<region>``)."""
        ids: list[int | None] = [None] * self.n_objects
        for m in self.mentions:
            if m.intro:
                ids[m.object] = m.object_id
        return ids

    def text(self, turn: str) -> str:
        return self.question if turn == "question" else self.answer


@dataclass(frozen=True)
class InputProblem:
    """A record left out, with why: reason codes (``CODES``) and one human-readable reason per code."""

    source: str
    position: int
    index: str | None
    id: Any
    codes: tuple[str, ...]
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "position": self.position,
            "index": self.index,
            "id": self.id,
            "codes": list(self.codes),
            "reasons": list(self.reasons),
        }


def make_index(kind: str, source: str | Path, position: int) -> str:
    """``videorefer_<subset>_<sha1(file name)[:8]>_<position>``: contains "qa" iff kind == "qa" (module doc)."""
    if kind not in SUBSET_NAMES:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    tag = hashlib.sha1(Path(source).name.encode("utf-8")).hexdigest()[:8]
    return f"videorefer_{SUBSET_NAMES[kind]}_{tag}_{int(position)}"


def parse_placeholders(text: str, turn: str) -> list[Placeholder]:
    """Every placeholder of ``text`` in order, with its span, N, and whether it introduces an object."""
    out = []
    for m in _PLACEHOLDER.finditer(text):
        if m.group("intro") is not None:
            out.append(Placeholder(turn, m.start(), m.end(), m.group(), int(m.group("intro")), True))
        elif m.group("bare") is not None:
            out.append(Placeholder(turn, m.start(), m.end(), m.group(), None, True))
        elif m.group("ref") is not None:
            out.append(Placeholder(turn, m.start(), m.end(), m.group(), int(m.group("ref")), False))
        else:
            out.append(Placeholder(turn, m.start(), m.end(), m.group(), None, False, malformed=True))
    return out


class _Problems:
    """Reason codes in first-seen order, one reason per code (details joined, the first few kept)."""

    def __init__(self) -> None:
        self.details: dict[str, list[str]] = {}

    def add(self, code: str, detail: str) -> None:
        self.details.setdefault(code, []).append(detail)

    def __bool__(self) -> bool:
        return bool(self.details)

    def items(self) -> list[tuple[str, str]]:
        out = []
        for code, details in self.details.items():
            text = "; ".join(details[:3])
            if len(details) > 3:
                text += f"; and {len(details) - 3} more"
            out.append((code, text))
        return out

    def error(self) -> RawRecordError:
        items = self.items()
        return RawRecordError([c for c, _ in items], [r for _, r in items])


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _texts(obj: dict, kind: str, problems: _Problems) -> tuple[str | None, str | None]:
    if kind in TRAIN_KINDS:
        conv = obj.get("conversations")
        if not isinstance(conv, list):
            problems.add("turns", f"conversations: expected a list of 2 turns, got {type(conv).__name__}")
            return None, None
        if len(conv) != 2 or not all(isinstance(t, dict) for t in conv):
            problems.add(
                "turns", f"conversations: expected one human and one gpt turn, got {len(conv)} turns"
            )
            return None, None
        human, gpt = conv
        if human.get("from") not in HUMAN_ROLES or gpt.get("from") not in GPT_ROLES:
            roles = [t.get("from") for t in conv]
            problems.add("turns", f"conversations: expected roles human, gpt; got {roles}")
            return None, None
        if not _nonempty_str(human.get("value")) or not _nonempty_str(gpt.get("value")):
            problems.add(
                "turns", "conversations[*].value: the human and gpt values must be non-empty strings"
            )
            return None, None
        question = strip_media_placeholder(human["value"])
        if not question:
            problems.add("turns", "conversations[0].value: empty apart from <video>")
            return None, None
        return question, gpt["value"]
    if kind == "bench_d":
        if not _nonempty_str(obj.get("caption")):
            problems.add("turns", "caption: missing or not a non-empty string")
            return None, None
        return BENCH_D_SOURCE_QUESTION, obj["caption"]
    missing = [k for k in ("Question", "Answer") if not _nonempty_str(obj.get(k))]
    options = obj.get("options")
    if not (isinstance(options, list) and options and all(_nonempty_str(o) for o in options)):
        missing.append("options")
    if missing:
        problems.add(
            "turns", f"{', '.join(missing)}: missing or empty (Bench-Q needs Question, options, Answer)"
        )
        return None, None
    return obj["Question"], obj["Answer"]


def read_raw(
    obj: Any, *, kind: str, source: str | Path, position: int, video_root: str | Path | None = None
) -> RawRecord:
    """Parse one raw record; raises `RawRecordError` listing every structural problem found (codes ``shape``,
    ``turns``, ``placeholder_count``, ``unknown_object``, ``duplicate_object``, ``options_placeholder``).
    ``video`` resolves against ``video_root`` (default: the input file's folder) to an absolute path."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if not isinstance(obj, dict):
        raise RawRecordError(["shape"], [f"<record>: expected a JSON object, got {type(obj).__name__}"])
    problems = _Problems()
    question, answer = _texts(obj, kind, problems)

    video = obj.get("video")
    if not _nonempty_str(video):
        problems.add("shape", f"video: expected a non-empty path string, got {video!r}"[:200])
    annotation = obj.get("annotation")
    if not isinstance(annotation, list):
        problems.add(
            "shape", f"annotation: expected a list (one dict per object), got {type(annotation).__name__}"
        )
        annotation = None
    elif bad := [k for k, a in enumerate(annotation) if not isinstance(a, dict)]:
        problems.add(
            "shape", f"annotation{bad[:3]}: expected a dict (frame index -> {{'segmentation': ...}})"
        )
        annotation = None
    for key in ("height", "width"):
        v = obj.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            problems.add("shape", f"{key}: expected a positive integer, got {v!r}")
    if (obj.get("height") is None) != (obj.get("width") is None):
        problems.add("shape", "height/width: give both or neither")

    mentions: list[Mention] = []
    if question is not None and answer is not None:
        found = parse_placeholders(question, "question") + parse_placeholders(answer, "answer")
        intros = [p for p in found if p.intro and p.turn == "question"]
        if annotation is not None and len(intros) != len(annotation):
            problems.add(
                "placeholder_count",
                f"question: {len(intros)} object introduction(s) (<region> placeholders) but annotation has "
                f"{len(annotation)} object(s)",
            )
        for p in found:
            if p.intro and p.turn == "answer":
                problems.add("placeholder_count", f"answer: {p.text!r} at {p.start} (answers may only "
                             "back-reference objects: <objectN>)")  # fmt: skip
            elif p.malformed:
                code = "placeholder_count" if "region" in p.text.lower() else "unknown_object"
                problems.add(code, f"{p.turn}: malformed placeholder {p.text!r} at {p.start}")
        id_to_k: dict[int, int] = {}
        for k, p in enumerate(intros):
            if p.object_id is None:
                continue
            if p.object_id in id_to_k:
                problems.add("duplicate_object", f"question: <object{p.object_id}> introduced twice")
            else:
                id_to_k[p.object_id] = k
        for p in found:
            if not p.intro and not p.malformed and p.object_id not in id_to_k:
                problems.add("unknown_object", f"{p.turn}: {p.text} at {p.start} was never introduced")
        if kind == "bench_q":
            for i, option in enumerate(obj["options"]):
                if parse_placeholders(option, "options"):
                    problems.add("options_placeholder", f"options[{i}]: {option!r} contains a placeholder")
        if not problems:
            k_of = iter(range(len(intros)))
            for p in found:
                k = next(k_of) if p.intro else id_to_k[p.object_id]
                mentions.append(Mention(k, p.object_id, p.turn, p.start, p.end, p.intro))
    if problems:
        raise problems.error()

    root = Path(video_root) if video_root is not None else Path(source).parent
    path = Path(video).expanduser()
    return RawRecord(
        kind=kind,
        source=str(source),
        position=position,
        index=make_index(kind, source, position),
        id=obj.get("id"),
        video=os.path.abspath(path if path.is_absolute() else root / path),
        question=question,
        answer=answer,
        n_objects=len(annotation),
        mentions=tuple(mentions),
        obj=obj,
    )


def _record_hw(obj: Mapping[str, Any]) -> tuple[int, int] | None:
    h, w = obj.get("height"), obj.get("width")
    return (int(h), int(w)) if h is not None and w is not None else None


def _int_frame(key: Any) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key if key >= 0 else None
    if isinstance(key, str) and _FRAME_KEY.fullmatch(key):
        return int(key)
    return None


def check_raw(
    record: RawRecord,
    *,
    probe: Callable[[str], VideoInfo] | None = probe_video,
    max_objects: int = DEFAULT_MAX_OBJECTS,
) -> list[tuple[str, str]]:
    """``(code, reason)`` for every content problem of a parsed record (empty: fine), one entry per code.

    With ``probe`` (default `probe_video`) the video must exist and be readable, masks must match its frame
    size and frame indices its length; with ``probe=None`` the video is not looked at and masks are checked
    against the record's ``height``/``width`` only (when present).
    """
    problems = _Problems()
    n = record.n_objects
    if n == 0:
        problems.add("no_objects", "annotation: empty, the record refers to no object")
    if n > max_objects:
        problems.add("too_many_objects", f"annotation: {n} objects, more than max_objects={max_objects}")

    info: VideoInfo | None = None
    if probe is not None:
        if not os.path.exists(record.video):
            problems.add("missing_video", f"video: {record.video} does not exist")
        else:
            try:
                info = probe(record.video)
            except Exception as e:  # any failure to open the video is this record's problem
                problems.add("unreadable_video", f"video: {record.video}: {type(e).__name__}: {e}"[:500])
    obj = record.obj
    record_hw = _record_hw(obj)
    video_hw = (info.height, info.width) if info is not None else None
    if record_hw and video_hw and record_hw != video_hw:
        problems.add("mask_size", f"height/width: record says {record_hw}, the video is {video_hw}")
    frame_hw = video_hw or record_hw

    if "frame_idx" in obj:
        f = _int_frame(obj["frame_idx"])
        if f is None:
            problems.add("frame_key", f"frame_idx: {obj['frame_idx']!r} is not a non-negative integer")
        elif info is not None and f >= info.num_frames:
            problems.add("frame_range", f"frame_idx: {f} >= the video's {info.num_frames} frames")

    for k, ann in enumerate(obj["annotation"]):
        field = f"annotation[{k}]"
        nonempty, failed = False, False
        for key, entry in ann.items():
            frame = _int_frame(key)
            where = f"{field}[{key!r}]"
            if frame is None:
                problems.add("frame_key", f"{where}: frame key is not a non-negative integer string")
                failed = True
                continue
            if info is not None and frame >= info.num_frames:
                problems.add("frame_range", f"{where}: frame {frame} >= the video's {info.num_frames} frames")
            if not isinstance(entry, Mapping) or "segmentation" not in entry:
                problems.add(
                    "mask_decode", f"{where}: expected {{'segmentation': ...}}, got {str(entry)[:80]}"
                )
                failed = True
                continue
            seg = entry["segmentation"]
            if seg is None:
                continue
            if isinstance(seg, Mapping) and frame_hw is not None and _rle_size(seg) not in (None, frame_hw):
                problems.add(
                    "mask_size", f"{where}.segmentation: size {_rle_size(seg)} != frame size {frame_hw}"
                )
                failed = True
                continue
            try:
                mask = decode_segmentation(seg, *(frame_hw or (None, None)))
            except MaskDecodeError as e:
                problems.add("mask_decode", f"{where}.segmentation: {e}")
                failed = True
                continue
            if frame_hw is not None and mask.shape != frame_hw:
                problems.add("mask_size", f"{where}.segmentation: mask {mask.shape} != frame size {frame_hw}")
                failed = True
                continue
            nonempty = nonempty or bool(mask.any())
        if not nonempty and not failed:
            problems.add("empty_masks", f"{field}: no non-empty mask on any of its {len(ann)} frame(s)")
    return problems.items()


def _rle_size(seg: Mapping[str, Any]) -> tuple[int, int] | None:
    size = seg.get("size")
    try:
        return (int(size[0]), int(size[1])) if size is not None else None
    except (TypeError, ValueError, IndexError, KeyError):
        return None


class _CachedProbe:
    """`probe` memoised per path, failures included: each distinct video is opened at most once."""

    def __init__(self, probe: Callable[[str], VideoInfo]):
        self.probe = probe
        self.cache: dict[str, VideoInfo | BaseException] = {}

    def __call__(self, path: str) -> VideoInfo:
        if path not in self.cache:
            try:
                self.cache[path] = self.probe(path)
            except Exception as e:
                self.cache[path] = e
        result = self.cache[path]
        if isinstance(result, BaseException):
            raise result
        return result


class CheckMemo:
    """Input checks and video probes remembered across passes over the same files (``swim data build`` reads
    its inputs once to send and once to write): a record's masks are decoded and its video opened once.

    With a ``path``, every result is also appended to that JSONL file and read back by the next run, so a resumed
    build does not decode every mask again. A result is reused only while its input file has the same size and
    modification time and the check settings (video root, video checks, object limit) are the same.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.results: dict[tuple[str, int], tuple[str, tuple, tuple, tuple | None]] = {}
        self.probe: _CachedProbe | None = None
        self.path = Path(path) if path is not None else None
        self._file = None
        self._stamps: dict[tuple[str, str], str] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                    self.results[(e["s"], e["p"])] = (
                        e["f"],
                        tuple(e["c"]),
                        tuple(e["r"]),
                        e["v"] and tuple(e["v"]),
                    )
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a partial last line from a kill: that record is checked again

    def stamp(self, source: str, settings: str) -> str:
        key = (source, settings)
        if key not in self._stamps:
            st = os.stat(source)
            self._stamps[key] = f"{st.st_size}:{st.st_mtime_ns}:{settings}"
        return self._stamps[key]

    def get(self, source: str, position: int, settings: str):
        """(codes, reasons, video info) of an earlier check of this record, or None."""
        hit = self.results.get((source, position))
        if hit is None or hit[0] != self.stamp(source, settings):
            return None
        return hit[1:]

    def put(
        self, source: str, position: int, settings: str, codes: tuple, reasons: tuple, video: tuple | None
    ):
        stamp = self.stamp(source, settings)
        self.results[(source, position)] = (stamp, codes, reasons, video)
        if self.path is not None:
            if self._file is None:
                self._file = self.path.open("a", encoding="utf-8")
            line = {
                "s": source,
                "p": position,
                "f": stamp,
                "c": list(codes),
                "r": list(reasons),
                "v": video and list(video),
            }
            self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def iter_raw(
    paths: Sequence[str | Path] | str | Path,
    kind: str,
    *,
    video_root: str | Path | None = None,
    check_videos: bool = True,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    probe: Callable[[str], VideoInfo] | None = None,
    memo: CheckMemo | None = None,
    workers: int = 1,
) -> Iterator[RawRecord | InputProblem]:
    """Stream the records of ``paths`` (all of one ``kind``): a `RawRecord` (with ``video_info`` when videos
    are checked) for each good one, an `InputProblem` for each bad one — never raising for one record.

    Videos are probed (``probe``, default `probe_video`) at most once per distinct path; with
    ``check_videos=False`` they are not looked at. A syntax error inside a JSON array ends that file with an
    ``InputProblem`` (code ``json``) at the failing position; a file that cannot be opened raises `RecordError`.
    With a ``memo`` (`CheckMemo`), the content checks and probes of an earlier pass (or run) are reused.
    With ``workers`` > 1 the content checks (mask decoding, probes) run in that many processes, at most
    ``4 * workers`` records ahead of the reader; the order and the results are the same.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    cached = _CachedProbe(probe or probe_video) if check_videos else None
    if memo is not None and cached is not None:
        memo.probe = cached = memo.probe or cached
    settings = json.dumps([str(video_root) if video_root is not None else None, check_videos, max_objects])
    pool = None
    if workers > 1:
        if probe is not None:
            raise ValueError("workers > 1 probes with probe_video in each process: do not pass a probe")
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    window: deque[tuple[RawRecord | InputProblem, Any, bool]] = deque()  # (item, result or Future, fresh)

    def finish(item, value, fresh: bool) -> RawRecord | InputProblem:
        if isinstance(item, InputProblem):
            return item
        codes, reasons, video = value.result() if isinstance(value, Future) else value
        if fresh and memo is not None:
            memo.put(item.source, item.position, settings, codes, reasons, video)
        if codes:
            return InputProblem(item.source, item.position, item.index, item.id, codes, reasons)
        return replace(item, video_info=VideoInfo(*video)) if video is not None else item

    try:
        for item in _parsed_records(paths, kind, video_root):
            if isinstance(item, InputProblem):
                window.append((item, None, False))
            elif memo is not None and (earlier := memo.get(item.source, item.position, settings)) is not None:
                window.append((item, earlier, False))
            elif pool is not None:
                window.append((item, pool.submit(_check_in_worker, item, max_objects, check_videos), True))
            else:
                window.append((item, content_check(item, cached, max_objects), True))
            while window and (len(window) > 4 * workers or not _pending(window[0][1])):
                yield finish(*window.popleft())
        while window:
            yield finish(*window.popleft())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _pending(value: Any) -> bool:
    return isinstance(value, Future) and not value.done()


def content_check(record: RawRecord, cached: _CachedProbe | None, max_objects: int):
    """(codes, reasons, (frames, fps, height, width) or None) of `check_raw` and the video probe."""
    found = check_raw(record, probe=cached, max_objects=max_objects)
    codes, reasons = (tuple(x) for x in zip(*found)) if found else ((), ())
    info = cached(record.video) if cached is not None and not codes else None
    return codes, reasons, None if info is None else (info.num_frames, info.fps, info.height, info.width)


_WORKER_PROBE: _CachedProbe | None = None


def _check_in_worker(record: RawRecord, max_objects: int, check_videos: bool):
    global _WORKER_PROBE
    if check_videos and _WORKER_PROBE is None:
        _WORKER_PROBE = _CachedProbe(probe_video)
    return content_check(record, _WORKER_PROBE if check_videos else None, max_objects)


def _parsed_records(paths: Sequence[str | Path], kind: str, video_root) -> Iterator[RawRecord | InputProblem]:
    """Read and structurally parse every record (`read_raw`); content checks come after."""
    for path in paths:
        source = str(path)
        records = iter_json_records(path, bad_lines="yield")
        while True:
            try:
                item = next(records, None)
            except RecordError as e:
                if e.code == "file":
                    raise
                position = e.index or 0
                logger.error("%s: stopped reading: %s", source, e.reason)
                yield InputProblem(source, position, make_index(kind, source, position), None, ("json",),
                                   (f"{e.field}: {e.reason}",))  # fmt: skip
                break
            if item is None:
                break
            position, obj = item
            index = make_index(kind, source, position)
            if isinstance(obj, RecordError):
                yield InputProblem(source, position, index, None, ("json",), (f"{obj.field}: {obj.reason}",))
                continue
            rid = obj.get("id") if isinstance(obj, dict) else None
            try:
                yield read_raw(obj, kind=kind, source=source, position=position, video_root=video_root)
            except RawRecordError as e:
                yield InputProblem(source, position, index, rid, e.codes, e.reasons)


# ---------------------------------------------------------------------------------------------------------
# The "format" step


def _frame_size(record: RawRecord) -> tuple[int, int] | None:
    """The frame size for decoding: the record's height/width, else the probed video's, else any RLE's."""
    hw = _record_hw(record.obj)
    if hw is not None:
        return hw
    if record.video_info is not None:
        return record.video_info.height, record.video_info.width
    for ann in record.obj.get("annotation", ()):
        for entry in ann.values():
            seg = entry.get("segmentation") if isinstance(entry, Mapping) else None
            if isinstance(seg, Mapping) and (size := _rle_size(seg)) is not None:
                return size
    return None


def normalise_segmentation(seg: Any, frame_hw: tuple[int, int] | None) -> dict:
    """Any segmentation -> COCO compressed RLE ``{"size": [h, w], "counts": str}``; None -> all zeros."""
    if seg is None:
        if frame_hw is None:
            raise MaskDecodeError(
                "a null segmentation needs the frame size (no height/width, no probed video)"
            )
        return encode_mask(np.zeros(frame_hw, np.uint8))
    if (
        isinstance(seg, Mapping)
        and isinstance(seg.get("counts"), (str, bytes))
        and seg.get("size") is not None
    ):
        counts = seg["counts"]
        size = _rle_size(seg)
        if size is None:
            raise MaskDecodeError(f"bad RLE size {seg.get('size')!r}")
        return {"size": list(size), "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
    return encode_mask(decode_segmentation(seg, *(frame_hw or (None, None))))


def formatted(record: RawRecord) -> dict:
    """The deterministic "format" record: ``index``, ``id``, absolute ``video``, every other key of the input
    verbatim (``conversations`` / ``caption`` / ``Question``, ``type``, ``options``, ``Answer``, ``frame_idx``,
    ``height``/``width``, ``ratio``, ...), and ``annotation`` with every segmentation as compressed RLE (a
    null one becomes an all-zero mask of the frame size: SWIM decodes with bare pycocotools). Raises
    `MaskDecodeError` for a segmentation that does not decode (`check_raw` reports those first)."""
    frame_hw = _frame_size(record)
    out: dict[str, Any] = {"index": record.index, "id": record.obj.get("id"), "video": record.video}
    for key, value in record.obj.items():
        if key in out:
            continue
        if key == "annotation":
            out[key] = [
                {
                    frame: {
                        **{k: copy.deepcopy(v) for k, v in entry.items() if k != "segmentation"},
                        "segmentation": normalise_segmentation(entry["segmentation"], frame_hw),
                    }
                    for frame, entry in ann.items()
                }
                for ann in value
            ]
        else:
            out[key] = copy.deepcopy(value)
    return out
