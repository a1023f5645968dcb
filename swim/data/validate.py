"""``swim validate PATH [--data-root R] [--json] [--strict] [--query Q]``: check every record of a record file or
mixture.

With ``--layout mevis|ytvos|davis|refcoco`` (``--split``, ``--dataset``), PATH is a referring-segmentation dataset
folder instead, checked by `swim.data.rvos.validate_layout` / `swim.data.refcoco.validate_refcoco` (frames and
images present, masks decodable, of the frame size and not empty), with the same one-line-per-problem report.

PATH is a record file (``.json`` array / ``.jsonl``) or a mixture YAML (`swim.data.mixture`). Each record is
checked for: JSON shape and types; empty or malformed conversations; unclosed, nested or stray ``<ins>``
tags; tag/object count mismatch; Qwen control-token strings (``<|im_end|>``, ``<|video_pad|>``, ...) in the
text, which the tokenizer would read as control tokens (`check_control_tokens`); missing or unreadable/corrupt
video or image (probed once per distinct video, the slow part); RLE/polygon decode; mask size vs video size;
annotated frame index beyond the video (image index beyond the record's images); boxes, points and polylines
malformed (wrong arity, degenerate: reported when the file is read) or outside their frame (``out_of_bounds``).

Output: one line per problem, ``file:index: field: reason``, then a summary; ``--json`` prints a JSON list of
``{"file", "index", "field", "reason", "code"}`` instead. Exit status 1 if there is any problem.
``--strict`` stops at the first problem.

Records with annotations (masks, boxes, points) but no ``<ins>`` tag at all are the mark of answer-supervised
(KLAL) data checked with the default ``--query tags``, or of SWIM data that lost its tags: they are still
``tag_count`` problems (one per record in ``--json``, and in the count), but the text output replaces their lines
by one note per file (`UntaggedNote`) that names both ways out, ``--query answer_last`` / ``answer_all`` or adding
the tags (with ``--json`` the note goes to stderr).

`check_record` is the single implementation of the semantic checks; `swim.data.dataset.SwimDataset` calls
it too (with ``decode_masks=False``, because the dataset decodes the masks anyway when it builds targets).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from swim.data.control_tokens import find_control_tokens
from swim.data.geometry import bounds_problem, entry_kind
from swim.data.masks import MaskDecodeError, decode_segmentation
from swim.data.records import Record, RecordError, load_records
from swim.data.tags import QUERY_MODES, TagError, assign_objects, check_turn_tags
from swim.data.video import VideoDecodeError, VideoInfo, VideoSettings, probe_video

logger = logging.getLogger(__name__)


def turn_field(record: Record, turn: int) -> str:
    """The JSON field that holds conversation turn ``turn`` of ``record`` (for error messages)."""
    if record.kind == "bench_q":
        return "Question" if turn == 0 else "Answer"
    if record.kind == "bench_d" and record.question is None:
        return "caption"
    return f"conversations[{turn}].value"


def needs_tags(record: Record, *, supervise_qa: bool = False, query: str = "tags") -> bool:
    """Whether each annotated object of ``record`` needs its own tagged phrase: its annotation is supervised and
    the supervised rows are the tagged words (``query="tags"``; with answer-token rows tags are optional)."""
    return query == "tags" and bool(record.annotation) and not record.text_only(supervise_qa)


def untagged_reason(n_objects: int) -> str:
    """The per-record reason for annotated objects without any ``<ins>`` tag: short (it is repeated per record
    in ``--json``), but naming both ways out, since either the tags or the ``--query`` is what is wrong."""
    return (
        f"{n_objects} annotated object(s) but no <ins>-tagged phrase (--query tags, the default, needs one per "
        "object): tag each object's phrase, or validate answer-supervised (KLAL) records with "
        "--query answer_last"
    )


def check_tags(record: Record, *, supervise_qa: bool = False, query: str = "tags") -> list[RecordError]:
    """Malformed tags, and (for records with supervised masks whose rows are the tagged words, ``query="tags"``)
    the tag/object count. With answer-token rows (``answer_last`` / ``answer_all``) tags are optional.

    A record with no tag at all keeps the code ``tag_count`` (the dataset drops its supervision and counts it,
    as for any count mismatch) but gets a reason that says what to do about it (`untagged_reason`)."""
    try:
        phrases = check_turn_tags(record.turns())
    except TagError as e:
        return [record.error(turn_field(record, e.turn or 0), e.reason, "tags")]
    if not needs_tags(record, supervise_qa=supervise_qa, query=query):
        return []
    if not phrases:
        return [record.error("annotation", untagged_reason(len(record.annotation)), "tag_count")]
    _, reason = assign_objects(phrases, len(record.annotation))
    return [record.error("annotation", reason, "tag_count")] if reason else []


def check_control_tokens(record: Record) -> list[RecordError]:
    """One problem per turn whose text contains Qwen control-token strings (`swim.data.control_tokens`)."""
    problems = []
    for t, turn in enumerate(record.turns()):
        found = find_control_tokens(turn.text)
        if not found:
            continue
        field = turn_field(record, t)
        if record.kind == "bench_q" and t == 0 and not find_control_tokens(record.question):
            field = "options"  # a Bench-Q prompt is the question, the options and a fixed instruction
        tokens = ", ".join(repr(tok) for tok in found)
        reason = (
            f"contains Qwen control token(s) {tokens}; the tokenizer reads them as control tokens, not text"
        )
        problems.append(record.error(field, reason, "control_tokens"))
    return problems


@dataclass
class ImagesInfo:
    """The sizes `(height, width)` of an image record's images, in order (image i is annotation frame i)."""

    sizes: list[tuple[int, int]]

    @property
    def num_frames(self) -> int:
        return len(self.sizes)


MediaInfo = VideoInfo | ImagesInfo


def probe_media(record: Record, settings: VideoSettings | None = None) -> MediaInfo:
    """Probe the record's video, or open its images; raises `RecordError` (``missing_video`` /
    ``unreadable_video``, ``missing_image`` / ``unreadable_image``)."""
    kind, files = record.media_files
    for i, path in enumerate(files):
        if not path.exists():
            field = kind if len(files) == 1 else f"{kind}[{i}]"
            raise record.error(field, f"not found: {path}", f"missing_{kind}")
    if kind == "image":
        return ImagesInfo([_image_size(record, path, i, len(files)) for i, path in enumerate(files)])
    try:
        return probe_video(files[0], settings)
    except VideoDecodeError as e:
        raise record.error("video", f"unreadable: {e.reason}", "unreadable_video") from None


def _image_size(record: Record, path: Path, i: int, n: int) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
            return im.height, im.width
    except Exception as e:
        field = "image" if n == 1 else f"image[{i}]"
        raise record.error(field, f"unreadable: {path}: {e}", "unreadable_image") from None


def check_masks(record: Record, info: MediaInfo, *, decode_masks: bool = True) -> list[RecordError]:
    """Annotated frame (image) indices within the video (the record's images), mask size == frame size, boxes,
    points and polylines inside the frame (``out_of_bounds``), and (``decode_masks``) that every RLE/polygon
    decodes to a mask of the frame's size."""
    problems = []
    images = isinstance(info, ImagesInfo)
    rec_hw = (getattr(record, "height", None), getattr(record, "width", None))
    if all(rec_hw) and (not images or info.num_frames == 1):
        hw = info.sizes[0] if images else (info.height, info.width)
        if rec_hw != hw:
            problems.append(record.error("height", f"record size {rec_hw[0]}x{rec_hw[1]} != {'image' if images else 'video'} "
                                         f"size {hw[0]}x{hw[1]}", "mask_size"))  # fmt: skip
    for k, obj in enumerate(record.annotation):
        for frame, entry in obj.items():
            field = f"annotation[{k}][{frame!r}]"
            if int(frame) >= info.num_frames:
                what = (
                    f"the record's {info.num_frames} image(s)"
                    if images
                    else f"the video ({info.num_frames} frames)"
                )
                problems.append(record.error(field, f"frame index {frame} beyond {what}", "frame_range"))
                if images:
                    continue
            hw = info.sizes[int(frame)] if images else (info.height, info.width)
            kind = entry_kind(entry)
            if kind != "segmentation":
                if reason := bounds_problem(kind, entry, *hw):
                    problems.append(record.error(f"{field}.{kind}", reason, "out_of_bounds"))
                continue
            seg = entry["segmentation"]
            if seg is None:  # not annotated on this frame
                continue
            if isinstance(seg, dict) and tuple(seg["size"]) != hw:
                size = f"{seg['size'][0]}x{seg['size'][1]}"
                problems.append(
                    record.error(
                        f"{field}.segmentation",
                        f"mask size {size} != video size {hw[0]}x{hw[1]}",
                        "mask_size",
                    )
                )
                continue
            if decode_masks:
                try:
                    mask = decode_segmentation(seg, *hw)
                except (MaskDecodeError, ValueError, TypeError) as e:
                    problems.append(
                        record.error(f"{field}.segmentation", f"cannot decode: {e}", "mask_decode")
                    )
                    continue
                if tuple(mask.shape) != hw:
                    got = f"{mask.shape[0]}x{mask.shape[1]}"
                    problems.append(
                        record.error(
                            f"{field}.segmentation",
                            f"mask size {got} != video size {hw[0]}x{hw[1]}",
                            "mask_size",
                        )
                    )
    return problems


def check_record(
    record: Record,
    info: MediaInfo | None,
    *,
    decode_masks: bool = True,
    supervise_qa: bool = False,
    masks: bool = True,
    query: str = "tags",
) -> list[RecordError]:
    """All semantic checks of one (already shape-validated) record against its probed media ``info``.

    ``masks=False`` skips the annotation checks (text-only samples do not use their annotations); ``query``: how
    the supervised rows are chosen (`swim.data.tags.QUERY_SELECTORS`).
    """
    problems = check_tags(record, supervise_qa=supervise_qa, query=query)
    if masks and info is not None and record.annotation:
        problems += check_masks(record, info, decode_masks=decode_masks)
    return problems


def validate_records(
    records: Sequence[Record],
    *,
    settings: VideoSettings | None = None,
    decode_masks: bool = True,
    strict: bool = False,
    query: str = "tags",
) -> list[RecordError]:
    """Problems of every record; each distinct video (image set) is probed once."""
    probes: dict[tuple[Path, ...], MediaInfo | RecordError] = {}
    problems: list[RecordError] = []
    for rec in records:
        key = rec.media_files[1]
        if key not in probes:
            try:
                probes[key] = probe_media(rec, settings)
            except RecordError as e:
                probes[key] = e
        got = probes[key]
        found = check_tags(rec, query=query) + check_control_tokens(rec)
        if isinstance(got, RecordError):
            found.append(RecordError(rec.source, rec.position, got.field, got.reason, got.code))
        elif rec.annotation:
            found += check_masks(rec, got, decode_masks=decode_masks)
        problems += found
        if strict and problems:
            break
    return problems


# ---------------------------------------------------------------------------------------------------------
# Annotated records without tags: one note per file instead of a count mismatch per record

_KIND_WORDS = {"segmentation": "masks", "box": "boxes", "points": "points", "polyline": "polylines"}
_SHOWN_INDICES = 5


@dataclass
class TagCensus:
    """Per file, for `UntaggedNote`: the positions of the annotated records with no ``<ins>`` tag, how many
    annotated records are tagged, and the annotation kinds the untagged ones carry."""

    untagged: set[int]
    tagged: int
    kinds: set[str]


def tag_census(records: Sequence[Record], query: str) -> TagCensus:
    """Which of a file's records need tags (`needs_tags`) and have none; malformed tags count as neither."""
    census = TagCensus(set(), 0, set())
    for rec in records:
        if not needs_tags(rec, query=query):
            continue
        try:
            phrases = check_turn_tags(rec.turns())
        except TagError:
            continue
        if phrases:
            census.tagged += 1
            continue
        census.untagged.add(rec.position)
        census.kinds |= annotation_kinds(rec)
    return census


def annotation_kinds(record: Record) -> set[str]:
    """The kinds of the record's annotation entries (``segmentation``, ``box``, ...); malformed entries are
    left out (the shape checks report them)."""
    kinds = set()
    for obj in record.annotation:
        for entry in obj.values():
            with contextlib.suppress(ValueError):
                kinds.add(entry_kind(entry))
    return kinds


@dataclass
class UntaggedNote:
    """Once per file: its annotated records without tags (those reported), and what to do about them."""

    source: str
    indices: list[int]
    tagged: int
    kinds: list[str]

    def __str__(self) -> str:
        shown = ", ".join(str(i) for i in self.indices[:_SHOWN_INDICES])
        more = len(self.indices) - _SHOWN_INDICES
        where = f"record(s) {shown}" + (f" and {more} more" if more > 0 else "")
        kinds = ", ".join(_KIND_WORDS.get(k, k) for k in self.kinds) or "annotations"
        mixed = ""
        if self.tagged:
            mixed = (f" The other {self.tagged} annotated record(s) of this file are tagged, so these may be SWIM "
                     "records that lost their tags.")  # fmt: skip
        return (
            f"{self.source}: annotation: {len(self.indices)} record(s) carry {kinds} but no <ins> tags ({where}); "
            "--query tags (the default, SWIM) supervises the attention of each object's <ins>-tagged phrase, so "
            f"it needs one tagged phrase per object.{mixed} If they are answer-supervised (KLAL-style) records, "
            "validate and train them with --query answer_last (attn_query: answer_last: the last token of each "
            "assistant answer attends to the object, as in KLAL) or --query answer_all (every token of the "
            "answer); if they are SWIM records, wrap each object's phrase in <ins>...</ins>."
        )


def _in_kind_order(kinds: set[str]) -> list[str]:
    """Masks, boxes, points, polylines (then anything else), for a stable note."""
    return sorted(
        kinds, key=lambda k: (list(_KIND_WORDS).index(k) if k in _KIND_WORDS else len(_KIND_WORDS), k)
    )


def untagged_notes(censuses: dict[str, TagCensus], problems: Sequence[RecordError]) -> list[UntaggedNote]:
    """One note per file whose reported ``tag_count`` problems include untagged records (after ``--strict``)."""
    reported: dict[str, list[int]] = {}
    for p in problems:
        census = censuses.get(p.source)
        if p.code == "tag_count" and census is not None and p.index in census.untagged:
            reported.setdefault(p.source, []).append(p.index)
    return [
        UntaggedNote(source, indices, censuses[source].tagged, _in_kind_order(censuses[source].kinds))
        for source, indices in reported.items()
    ]


def untagged_summary(notes: Sequence[UntaggedNote]) -> str:
    """The summary line's pointer to the notes (stdout may have gone to a file)."""
    untagged = sum(len(note.indices) for note in notes)
    if not untagged:
        return ""
    return (f"; {untagged} of them annotated without <ins> tags: --query answer_last for answer-supervised "
            "(KLAL) records, or add the tags (see the note above)")  # fmt: skip


def print_problems(problems: Sequence[RecordError], notes: Sequence[UntaggedNote]) -> None:
    """One line per problem, except a file's untagged records: its note, once, where the first of them was."""
    by_source = {note.source: (note, set(note.indices)) for note in notes}  # sets: files of 100k records
    printed: set[str] = set()
    for p in problems:
        note, untagged = by_source.get(p.source, (None, set()))
        if note is None or p.code != "tag_count" or p.index not in untagged:
            print(p)
        elif p.source not in printed:
            printed.add(p.source)
            print(note)


def collect(
    path: str | Path, data_root: str | None, strict: bool, query: str = "tags"
) -> tuple[int, list[RecordError], list[UntaggedNote]]:
    """(number of records read, problems, notes on untagged records) for a record file or a mixture YAML."""
    path = Path(path)
    problems: list[RecordError] = []
    censuses: dict[str, TagCensus] = {}
    if path.suffix in (".yaml", ".yml"):
        from swim.data.mixture import load_mixture_config

        config = load_mixture_config(path)
        sources: Iterable[tuple[Path, str | None]] = [(e.json_path, e.data_root) for e in config.datasets]
    else:
        sources = [(path, data_root)]
    n = 0
    for json_path, root in sources:
        try:
            records, bad = load_records(json_path, data_root=root, errors="collect")
        except RecordError as e:
            problems.append(e)
            continue
        problems += bad
        if strict and problems:
            break
        if records:
            censuses[str(records[0].source)] = tag_census(records, query)
        problems += validate_records(records, strict=strict, query=query)
        n += len(records) + len(bad)
        if strict and problems:
            break
    problems.sort(key=lambda e: (e.source, -1 if e.index is None else e.index))
    problems = problems[:1] if strict else problems
    return n, problems, untagged_notes(censuses, problems)


def collect_layout(args) -> tuple[int, list[RecordError]]:
    """(items read, problems) of a referring-segmentation dataset folder (`--layout`)."""
    if args.layout == "refcoco":
        from swim.data.refcoco import validate_refcoco

        n, problems = validate_refcoco(args.path, args.dataset, args.split or "val")
    else:
        from swim.data.rvos import validate_layout

        n, problems = validate_layout(args.path, args.layout, args.split)
    return n, problems[:1] if args.strict else problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="swim validate", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="record file (.json/.jsonl) or mixture YAML")
    parser.add_argument(
        "--data-root", default=None, help="media root for a record file (default: its folder)"
    )
    parser.add_argument("--json", action="store_true", help="print the problems as a JSON list")
    parser.add_argument("--strict", action="store_true", help="stop at the first problem")
    parser.add_argument(
        "--query", default="tags", choices=QUERY_MODES,
        help="how the supervised rows are chosen (as attn_query in training): with answer_last / answer_all the "
        "<ins> tags are optional, so their count is not checked against the objects",
    )  # fmt: skip
    parser.add_argument(
        "--layout",
        choices=["mevis", "ytvos", "davis", "refcoco"],
        help="PATH is a referring-segmentation dataset in this layout (swim.data.rvos, swim.data.refcoco)",
    )
    parser.add_argument("--split", help="with --layout: ytvos / davis / refcoco split")
    parser.add_argument(
        "--dataset", default="refcoco", help="with --layout refcoco: refcoco, refcoco+ or refcocog"
    )
    args = parser.parse_args(argv)

    notes: list[UntaggedNote] = []
    if args.layout:
        n, problems = collect_layout(args)
    else:
        n, problems, notes = collect(args.path, args.data_root, args.strict, args.query)
    if args.json:
        print(json.dumps([p.as_dict() for p in problems], indent=1))
        for note in notes:  # stdout stays the JSON list
            print(note, file=sys.stderr)
    else:
        print_problems(problems, notes)
        bad = len({(p.source, p.index) for p in problems})
        by_code = ", ".join(f"{c}: {k}" for c, k in Counter(p.code for p in problems).most_common())
        summary = f"{n} records checked, {len(problems)} problem(s) in {bad} record(s)"
        print(summary + (f" ({by_code})" if problems else "") + untagged_summary(notes), file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
