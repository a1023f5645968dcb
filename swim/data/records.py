"""Typed readers for the record files SWIM trains and evaluates on.

One dataclass per record type, each with a validating ``from_json(obj, *, source, index)`` that raises
`RecordError(source, index, field, reason)` on the first structural problem:

- `NLReferRecord`: NL-Refer "refined-format" training records (VideoRefer-700K with the ``<objectN><region>``
  prompts rewritten into natural language; the core referring word is wrapped in ``<ins>…</ins>``) and the
  refined VideoRefer-Bench-D (same shape); also on images (KLAL-style records: ``image`` + boxes / points /
  polylines, `swim.data.geometry`).
- `ChatRecord`: LLaVA-Video-178K style records (``video`` + ``conversations``, no masks) and image records
  (``image`` + ``conversations``).
- `BenchQRecord`: VideoRefer-Bench-Q, original (``<objectN><region>`` placeholders) or NL-refined (``<ins>``).
- `BenchDRecord`: VideoRefer-Bench-D, original (``caption``) or NL-refined (``conversations``).

`load_records(path)` reads a ``.json`` array or a ``.jsonl`` file and detects the type of each record (or takes
``kind=``). Relative media paths resolve against ``data_root``, which defaults to the record file's folder.
Examples of every format are in ``docs/data_formats.md``.

Only the *shape* is checked here (types, keys, frame-index keys, segmentation layout). Checks that need the
video or the decoded masks live in `swim.data.validate.check_record`, shared by the dataset and
``swim validate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from swim.data.geometry import entry_kind, entry_problem

logger = logging.getLogger(__name__)

# One object's annotation: original frame index (as a string, as in the files; an image's index for image records)
# -> {"segmentation": ...} / {"box": ...} / {"points": ...} / {"polyline": ..., "width": ...}.
ObjectAnnotation = dict[str, dict[str, Any]]

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
_MEDIA_PLACEHOLDER = re.compile(r"<(?:video|image)>\n?")


class RecordError(ValueError):
    """A problem with one record: which file, which record (0-based position), which field, and why.

    ``str(err)`` is the one-line report format ``file:index: field: reason``. ``index`` is None for
    problems with the file itself (unreadable, not JSON). ``code`` is a short machine-readable category
    (``shape``, ``conversations``, ``missing_video``, ``unreadable_video``, ``mask_decode``, ``mask_size``,
    ``frame_range``, ``tags``, ``tag_count``, ...) used to count skips by reason.
    """

    def __init__(self, source: str | Path, index: int | None, field: str, reason: str, code: str = "shape"):
        self.source = str(source)
        self.index = index
        self.field = field
        self.reason = reason
        self.code = code
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source if self.index is None else f"{self.source}:{self.index}"
        return f"{where}: {self.field}: {self.reason}"

    def __reduce__(self):  # picklable across DataLoader workers
        return (RecordError, (self.source, self.index, self.field, self.reason, self.code))

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "index": self.index,
            "field": self.field,
            "reason": self.reason,
            "code": self.code,
        }


@dataclass(frozen=True)
class Turn:
    """One conversation turn; ``text`` keeps its ``<ins>`` tags (removed later by `swim.data.tags`)."""

    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class _Base:
    source: str  # the record file
    position: int  # 0-based position of the record in its file
    data_root: str | None  # folder that relative media paths resolve against (None: the file's folder)

    def _resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        if p.is_absolute():
            return p
        root = Path(self.data_root) if self.data_root is not None else Path(self.source).parent
        return root / p

    def error(self, field: str, reason: str, code: str = "shape") -> RecordError:
        return RecordError(self.source, self.position, field, reason, code)

    @property
    def media_files(self) -> tuple[Literal["video", "image"], tuple[Path, ...]]:
        """("video", (path,)) or ("image", (path, ...)): the record's video, or its images in order."""
        images = getattr(self, "images", ())
        if images:
            return "image", tuple(self._resolve(i) for i in images)
        return "video", (self._resolve(self.video),)

    @property
    def media(self) -> tuple[Literal["video", "image"], Path]:
        """The media kind and the (first) file."""
        kind, files = self.media_files
        return kind, files[0]


@dataclass(frozen=True)
class NLReferRecord(_Base):
    """An NL-Refer training record (also the refined VideoRefer-Bench-D, which has the same shape), on a video or
    on one or more images (``"image": "a.png"`` or ``["a.png", "b.png"]`` instead of ``"video"``).

    ``annotation[k]`` holds the masks (or boxes, points, polylines: `swim.data.geometry`) of object k, keyed by
    frame index — for images, by image index (``"0"`` for a single image); with ``<ins>`` tags the k-th distinct
    tagged phrase refers to it. Records whose ``index`` contains ``"qa"`` or with an empty annotation train the
    text only (as the official code does) unless the dataset is built with ``supervise_qa=True`` (see
    `text_only`).
    """

    conversations: tuple[Turn, ...]
    annotation: tuple[ObjectAnnotation, ...]
    video: str | None = None
    images: tuple[str, ...] = ()
    index: str | None = None  # the file's own "index" field (e.g. "videorefer_detailed_caption_12")
    id: Any = None
    height: int | None = None
    width: int | None = None
    kind: str = field(default="nl_refer", init=False)

    @classmethod
    def from_json(cls, obj: Any, *, source: str | Path, index: int, data_root: str | None = None):
        r = _Reader(obj, source, index)
        video, images = r.media()
        return cls(
            source=str(source),
            position=index,
            data_root=data_root,
            video=video,
            images=images,
            conversations=r.conversations("conversations"),
            annotation=r.annotation("annotation"),
            index=r.optional("index", str),
            id=r.obj.get("id"),
            height=r.optional_int("height"),
            width=r.optional_int("width"),
        )

    def turns(self) -> tuple[Turn, ...]:
        return self.conversations

    def text_only(self, supervise_qa: bool = False) -> bool:
        """True if this record trains the text loss only: empty annotation, or a QA record (official rule)."""
        if not self.annotation:
            return True
        return not supervise_qa and self.index is not None and "qa" in self.index


@dataclass(frozen=True)
class ChatRecord(_Base):
    """A mask-free video or image conversation (LLaVA-Video-178K style, or ``image``: one path or a list)."""

    conversations: tuple[Turn, ...]
    video: str | None = None
    images: tuple[str, ...] = ()
    data_source: str | None = None
    id: Any = None
    annotation: tuple[ObjectAnnotation, ...] = ()
    kind: str = field(default="chat", init=False)

    @classmethod
    def from_json(cls, obj: Any, *, source: str | Path, index: int, data_root: str | None = None):
        r = _Reader(obj, source, index)
        video, images = r.media()
        return cls(
            source=str(source),
            position=index,
            data_root=data_root,
            conversations=r.conversations("conversations"),
            video=video,
            images=images,
            data_source=r.optional("data_source", str),
            id=r.obj.get("id"),
        )

    def turns(self) -> tuple[Turn, ...]:
        return self.conversations

    def text_only(self, supervise_qa: bool = False) -> bool:
        return True


BENCH_Q_SUFFIX = "Answer with the option's letter from the given choices directly."
BENCH_Q_TYPES = (  # VideoRefer-Bench-Q question types
    "Basic Questions",
    "Sequential Questions",
    "Relationship Questions",
    "Reasoning Questions",
    "Future Predictions",
)


@dataclass(frozen=True)
class BenchQRecord(_Base):
    """A VideoRefer-Bench-Q multiple-choice question (original or NL-refined ``Question``)."""

    video: str
    question: str
    options: tuple[str, ...]
    answer: str
    annotation: tuple[ObjectAnnotation, ...]
    type: str | None = None
    frame_idx: str | None = None
    id: Any = None
    kind: str = field(default="bench_q", init=False)

    @classmethod
    def from_json(cls, obj: Any, *, source: str | Path, index: int, data_root: str | None = None):
        r = _Reader(obj, source, index)
        options = r.require("options", list)
        if not options or not all(isinstance(o, str) and o.strip() for o in options):
            raise r.err("options", "must be a non-empty list of non-empty strings")
        return cls(
            source=str(source),
            position=index,
            data_root=data_root,
            video=r.path("video"),
            question=r.text("Question"),
            options=tuple(options),
            answer=r.text("Answer"),
            annotation=r.annotation("annotation", required=False),
            type=r.optional("type", str),
            frame_idx=_opt_str(r.obj.get("frame_idx")),
            id=r.obj.get("id"),
        )

    @property
    def answer_letter(self) -> str:
        m = re.match(r"\s*\(?([A-Z])\)?", self.answer)
        return m.group(1) if m else self.answer.strip()[:1]

    def prompt(self, suffix: str = BENCH_Q_SUFFIX) -> str:
        """The question, the options one per line, then the instruction (tags kept)."""
        return "\n".join([self.question.strip(), *self.options, suffix])

    def turns(self) -> tuple[Turn, ...]:
        return (Turn("user", self.prompt()), Turn("assistant", self.answer))

    def text_only(self, supervise_qa: bool = False) -> bool:
        return not (supervise_qa and self.annotation)


BENCH_D_PROMPT = "Please give a detailed description of the <ins>object</ins> in the video."


@dataclass(frozen=True)
class BenchDRecord(_Base):
    """A VideoRefer-Bench-D item: original (``caption``, no question) or refined (``conversations``)."""

    video: str
    caption: str  # the ground-truth description
    annotation: tuple[ObjectAnnotation, ...]
    question: str | None = None  # the refined prompt with <ins> tags; None in the original format
    frame_idx: str | None = None
    id: Any = None
    kind: str = field(default="bench_d", init=False)

    @classmethod
    def from_json(cls, obj: Any, *, source: str | Path, index: int, data_root: str | None = None):
        r = _Reader(obj, source, index)
        if "conversations" in r.obj:
            turns = r.conversations("conversations")
            question, caption = turns[0].text, turns[1].text
        elif "caption" in r.obj:
            question, caption = None, r.text("caption")
        else:
            raise r.err("caption", "missing (needs 'caption' or 'conversations')")
        return cls(
            source=str(source),
            position=index,
            data_root=data_root,
            video=r.path("video"),
            caption=caption,
            annotation=r.annotation("annotation", required=False),
            question=question,
            frame_idx=_opt_str(r.obj.get("frame_idx")),
            id=r.obj.get("id"),
        )

    def turns(self, default_prompt: str = BENCH_D_PROMPT) -> tuple[Turn, ...]:
        return (Turn("user", self.question or default_prompt), Turn("assistant", self.caption))

    def text_only(self, supervise_qa: bool = False) -> bool:
        return not self.annotation


Record = NLReferRecord | ChatRecord | BenchQRecord | BenchDRecord
RecordKind = Literal["auto", "nl_refer", "chat", "bench_q", "bench_d"]
_CLASSES: dict[str, type] = {
    "nl_refer": NLReferRecord,
    "chat": ChatRecord,
    "bench_q": BenchQRecord,
    "bench_d": BenchDRecord,
}


def detect_kind(obj: Mapping[str, Any]) -> str:
    """Record type from its keys: ``Question`` → bench_q; ``caption`` → bench_d (the refined Bench-D also has
    ``conversations``); ``annotation`` → nl_refer; otherwise chat (LLaVA-Video / image)."""
    if "Question" in obj or "options" in obj:
        return "bench_q"
    if "caption" in obj:
        return "bench_d"
    if "annotation" in obj:
        return "nl_refer"
    return "chat"


def record_from_json(
    obj: Any, *, source: str | Path, index: int, kind: RecordKind = "auto", data_root: str | None = None
) -> Record:
    """Validate one JSON object and build the matching record; raises `RecordError`."""
    if not isinstance(obj, dict):
        raise RecordError(source, index, "<record>", f"expected a JSON object, got {type(obj).__name__}")
    k = detect_kind(obj) if kind == "auto" else kind
    if k not in _CLASSES:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {['auto', *_CLASSES]}")
    return _CLASSES[k].from_json(obj, source=source, index=index, data_root=data_root)


def iter_json_objects(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, object)`` from a ``.json`` array (or single object) or a ``.jsonl`` file.

    A file that cannot be read or parsed raises `RecordError` with index None (``.json``) or the line's
    record index (``.jsonl``; the bad line is yielded as a `RecordError` object so that readers can go on).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(path, None, "<file>", f"cannot read: {e}", "file") from e
    if path.suffix == ".jsonl":
        n = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, RecordError(path, n, "<line>", f"invalid JSON on line {lineno}: {e.msg}", "json")
            n += 1
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(path, None, "<file>", f"invalid JSON: {e.msg} (line {e.lineno})", "json") from e
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise RecordError(
            path, None, "<file>", f"expected a JSON array of records, got {type(data).__name__}", "json"
        )
    yield from enumerate(data)


def load_records(
    path: str | Path,
    *,
    data_root: str | Path | None = None,
    kind: RecordKind = "auto",
    errors: Literal["raise", "collect"] = "raise",
) -> tuple[list[Record], list[RecordError]]:
    """Read and validate every record of ``path`` (``.json`` array or ``.jsonl``).

    Returns ``(records, problems)``. With ``errors="raise"`` the first bad record raises `RecordError`;
    with ``"collect"`` bad records are left out and their errors returned (file-level errors still raise).
    ``data_root`` (default: the file's folder) is stored on each record for resolving media paths.
    """
    root = str(data_root) if data_root is not None else None
    records: list[Record] = []
    problems: list[RecordError] = []
    for i, obj in iter_json_objects(path):
        try:
            if isinstance(obj, RecordError):
                raise obj
            records.append(record_from_json(obj, source=path, index=i, kind=kind, data_root=root))
        except RecordError as e:
            if errors == "raise":
                raise
            problems.append(e)
    logger.info("%s: %d records (%d malformed)", path, len(records), len(problems))
    return records, problems


def with_data_root(record: Record, data_root: str | Path | None) -> Record:
    """A copy of ``record`` whose relative media paths resolve against ``data_root``."""
    return dataclasses.replace(record, data_root=None if data_root is None else str(data_root))


def strip_media_placeholder(text: str) -> str:
    """Remove literal ``<video>`` / ``<image>`` placeholders (VideoRefer / LLaVA style); the chat template
    inserts Qwen's own vision tokens."""
    return _MEDIA_PLACEHOLDER.sub("", text).strip()


# ----------------------------------------------------------------------------------------------------------
# Field readers


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


class _Reader:
    """Typed access to one JSON object; every failure is a `RecordError` naming the field."""

    def __init__(self, obj: Any, source: str | Path, index: int):
        if not isinstance(obj, dict):
            raise RecordError(source, index, "<record>", f"expected a JSON object, got {type(obj).__name__}")
        self.obj, self.source, self.index = obj, source, index

    def err(self, field: str, reason: str) -> RecordError:
        code = "conversations" if field.startswith("conversations") else "shape"
        return RecordError(self.source, self.index, field, reason, code)

    def require(self, key: str, typ: type | tuple[type, ...]):
        if key not in self.obj:
            raise self.err(key, "missing")
        v = self.obj[key]
        if not isinstance(v, typ) or isinstance(v, bool):
            name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise self.err(key, f"expected {name}, got {type(v).__name__}")
        return v

    def optional(self, key: str, typ: type):
        v = self.obj.get(key)
        if v is not None and not isinstance(v, typ):
            raise self.err(key, f"expected {typ.__name__} or null, got {type(v).__name__}")
        return v

    def optional_int(self, key: str) -> int | None:
        v = self.obj.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self.err(key, f"expected a positive integer, got {v!r}")
        return v

    def text(self, key: str) -> str:
        v = self.require(key, str)
        if not v.strip():
            raise self.err(key, "empty")
        return v

    def path(self, key: str) -> str:
        v = self.require(key, str)
        if not v.strip():
            raise self.err(key, "empty path")
        return v

    def media(self) -> tuple[str | None, tuple[str, ...]]:
        """(video, images): exactly one of "video" (a path) or "image" (a path or a non-empty list of paths)."""
        has_video, has_image = "video" in self.obj, "image" in self.obj
        if has_video == has_image:
            raise self.err("video", "needs exactly one of 'video' or 'image'")
        if has_video:
            return self.path("video"), ()
        images = self.obj["image"]
        if isinstance(images, str):
            return None, (self.path("image"),)
        if not (
            isinstance(images, list) and images and all(isinstance(i, str) and i.strip() for i in images)
        ):
            raise self.err("image", "expected a path or a non-empty list of paths")
        return None, tuple(images)

    def conversations(self, key: str) -> tuple[Turn, ...]:
        conv = self.require(key, list)
        if len(conv) < 2:
            raise self.err(key, f"needs at least one human/gpt pair, got {len(conv)} turn(s)")
        turns = []
        for t, turn in enumerate(conv):
            f = f"{key}[{t}]"
            if not isinstance(turn, dict):
                raise self.err(f, f"expected an object, got {type(turn).__name__}")
            role = turn.get("from", turn.get("role"))
            if role in HUMAN_ROLES:
                role = "user"
            elif role in GPT_ROLES:
                role = "assistant"
            else:
                raise self.err(f"{f}.from", f"expected one of {HUMAN_ROLES + GPT_ROLES}, got {role!r}")
            expected = "user" if t % 2 == 0 else "assistant"
            if role != expected:
                raise self.err(f"{f}.from", f"turns must alternate human/gpt starting with human; got {role}")
            value = turn.get("value", turn.get("content"))
            if not isinstance(value, str):
                raise self.err(f"{f}.value", f"expected a string, got {type(value).__name__}")
            value = strip_media_placeholder(value) if role == "user" else value.strip()
            if not value:
                raise self.err(f"{f}.value", "empty")
            turns.append(Turn(role, value))
        if turns[-1].role != "assistant":
            raise self.err(key, "ends with a human turn (no answer)")
        return tuple(turns)

    def annotation(self, key: str, *, required: bool = True) -> tuple[ObjectAnnotation, ...]:
        if key not in self.obj and not required:
            return ()
        ann = self.require(key, list)
        out = []
        for k, obj in enumerate(ann):
            f = f"{key}[{k}]"
            if not isinstance(obj, dict):
                raise self.err(f, f"expected an object (frame index -> mask), got {type(obj).__name__}")
            if not obj:
                raise self.err(f, "object has no annotated frame")
            for frame, entry in obj.items():
                ff = f"{f}[{frame!r}]"
                if not (isinstance(frame, str) and frame.isdigit()):
                    raise self.err(ff, "frame key must be a non-negative integer string")
                if not isinstance(entry, dict):
                    raise self.err(
                        ff, f"expected an object such as {{'segmentation': ...}}, got {type(entry).__name__}"
                    )
                try:
                    kind = entry_kind(entry)
                except ValueError as e:
                    raise self.err(ff, str(e)) from None
                if kind == "segmentation":
                    _check_segmentation_shape(entry["segmentation"], self.err, f"{ff}.segmentation")
                elif problem := entry_problem(kind, entry):
                    raise self.err(f"{ff}.{kind}", problem)
            if all(entry.get("segmentation", True) is None for entry in obj.values()):
                raise self.err(f, "object has no annotated frame (all segmentations are null)")
            out.append(obj)
        return tuple(out)


def _check_segmentation_shape(seg: Any, err, field: str) -> None:
    """RLE dict ``{size: [h, w], counts: str | list[int]}`` or polygons ``[[x, y, x, y, ...], ...]``."""
    if seg is None:  # "not annotated on this frame" (as swim.data.masks reads it)
        return
    if isinstance(seg, dict):
        size = seg.get("size")
        if not (
            isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)
        ):
            raise err(field, f"RLE 'size' must be [height, width] positive integers, got {size!r}")
        counts = seg.get("counts")
        if not isinstance(counts, (str, list)) or (isinstance(counts, list) and not counts):
            raise err(field, "RLE 'counts' must be a string or a non-empty list of integers")
        return
    if isinstance(seg, list):
        if not seg:
            raise err(field, "empty polygon list")
        for p in seg:
            if not (
                isinstance(p, list)
                and len(p) >= 6
                and len(p) % 2 == 0
                and all(isinstance(c, (int, float)) for c in p)
            ):
                raise err(field, "polygon must be a flat list of >= 3 (x, y) pairs")
        return
    raise err(field, f"expected an RLE object or a polygon list, got {type(seg).__name__}")
