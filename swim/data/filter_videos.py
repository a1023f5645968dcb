"""``swim data filter-videos IN... --out OUT.json``: LLaVA-Video-178K records -> one file of valid, absolute records.

Why: SWIM mixes a subset of LLaVA-Video-178K (``filtered_valid_llava_video_178k_*.json``) into its training data,
but the script that made that file is not published. On the hub the dataset is split into one folder per
duration bucket and source (``0_30_s_academic_v0_1/0_30_s_academic_oe_v0_1_qa_processed.json``,
``30_60_s_youtube_v0_1/..._cap_processed.json``, ...), and each record's ``video`` is relative to its bucket
folder. SWIM's official loader accepts a LLaVA-Video record only when it has ``data_source``, at least two
conversation turns and a ``video`` path through a folder named ``LLaVA-Video-178K`` (so, absolute), and it
silently replaces a video it cannot read by zeros: a broken file trains the model on black frames without a
word. Validity must therefore be settled before training, which is what this command does:

- merge every input file (``.json`` array / ``.jsonl``; a folder means every such file under it, sorted);
- make each ``video`` absolute (against ``--video-root``, else the folder of the record's JSON file, without
  following symlinks) and fill a missing ``data_source`` with the bucket folder's name;
- drop, with a reason code, records whose text SWIM would reject and records whose video is missing, does not
  open, has no frames, does not decode at its first, middle and last frames, is longer than ``--max-seconds``
  or has an aspect ratio beyond ``--max-aspect`` (each distinct video is probed once, in parallel processes);
- optionally keep a seeded random subset of ``--num`` valid records (original order kept, byte-reproducible).

Outputs: OUT (a JSON array, one record per line), ``OUT.rejected.jsonl`` (one line per dropped record) and
``OUT.stats.json`` (counts and arguments), each written atomically. Exit status 0 when the run completed,
1 with ``--strict`` if anything was dropped, 2 for unusable input (a file that is not JSON, a missing path).
The output passes ``swim validate`` and reads as `ChatRecord`s. See docs/filter_videos.md.

Memory does not grow with the number of records beyond about 5 bytes each (LLaVA-Video-178K has about 1.3M):
the inputs are streamed twice with `swim.data.json_stream.iter_json_records`, never loaded whole.

1. `scan_inputs` reads every record, runs the text checks and keeps only the distinct absolute video paths
   and, per record, 4 bytes: the index of its video, or -1 if its text was rejected (`Scan`).
2. `probe_videos` settles each distinct video once.
3. `iter_results` reads the inputs again and `write_results` writes, in input order, each dropped record's
   rejected line (text rejections are re-derived, they are deterministic) and each kept record into OUT, one
   line at a time, to temporary files that are renamed over the outputs at the end. The ``--num`` subset is
   the same `draw_subset` over the ordinals of the valid records as when everything was held in memory, so
   the outputs are unchanged. An input that no longer reads as in pass 1 is unusable input (exit status 2).

A syntax error inside a ``.json`` array stops the reading of that file: the records before it are kept, the
error is logged and becomes a ``json`` rejected line at the position of the record that could not be read. A
file from which not even its first record can be read is unusable input (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from swim.data.json_stream import iter_json_records
from swim.data.records import RecordError, record_from_json
from swim.data.validate import check_control_tokens, check_tags
from swim.data.video import VideoDecodeError, VideoInfo, VideoSettings, probe_video, read_frames

logger = logging.getLogger(__name__)

OFFICIAL_DIR = "LLaVA-Video-178K"  # SWIM's official loader wants this folder name in every LLaVA-Video path
INPUT_SUFFIXES = (".json", ".jsonl")

# reason code -> meaning (docs/filter_videos.md lists the same)
REASONS: dict[str, str] = {
    "json": "a .jsonl line that is not valid JSON, or a syntax error in a .json array (the file is read up to it)",
    "shape": "not a LLaVA-Video chat record (not an object, wrong field types, video and image both given)",
    "conversations": "conversations missing or malformed, or fewer than 2 turns",
    "tags": "malformed <ins> tags in the text (swim validate would reject the record)",
    "control_tokens": "Qwen control-token strings in the text (swim validate would reject the record)",
    "no_video": "no usable 'video' field (missing, empty or not a string)",
    "missing_video": "the video file does not exist",
    "unreadable_video": "the video does not open, does not decode at its first/middle/last frame, or has no fps",
    "empty_video": "the video has no frames",
    "too_long": "duration above --max-seconds",
    "aspect_ratio": "aspect ratio beyond --max-aspect : 1 either way",
}
_NO_FRAMES = re.compile(r"\bno frames\b|has no \S+ frames")


@dataclass(frozen=True)
class ProbeLimits:
    max_seconds: float | None = None
    max_aspect: float | None = 12.0
    decode_timeout_s: float = 60.0


@dataclass(frozen=True)
class ProbeResult:
    """The verdict on one video: ``code`` None when valid, else a `REASONS` key with a human ``detail``."""

    code: str | None
    detail: str = ""
    num_frames: int = 0
    fps: float = 0.0
    height: int = 0
    width: int = 0


@dataclass(frozen=True)
class Rejected:
    """One dropped record, as written to the ``.rejected.jsonl`` file."""

    source: str
    position: int | None
    id: Any
    video: Any
    code: str
    detail: str


@dataclass(frozen=True)
class Candidate:
    """A record that passed the text checks; ``record`` already has its absolute video and data_source."""

    source: str
    position: int
    record: dict[str, Any]
    filled: bool = False  # data_source was missing and set to the bucket folder's name

    @property
    def video(self) -> str:
        return self.record["video"]


Entry = Candidate | Rejected  # one per record read, in input order


# ---------------------------------------------------------------------------------------------------------
# Inputs


def side_paths(out: Path) -> tuple[Path, Path]:
    """(rejected, stats) paths next to OUT: ``a.json`` -> ``a.rejected.jsonl``, ``a.stats.json``."""
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(f"{stem}.rejected.jsonl"), out.with_name(f"{stem}.stats.json")


def expand_inputs(paths: Sequence[Path], exclude: Iterable[Path] = ()) -> list[Path]:
    """Files in the order given; a folder gives its *.json / *.jsonl files, recursively, sorted. Files in
    ``exclude`` (this run's own outputs, which may sit in an input folder) are skipped when found by a scan.
    Raises FileNotFoundError for a path that does not exist or a folder without record files."""
    skip = {os.path.abspath(p) for p in exclude}
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in INPUT_SUFFIXES and p.is_file())
            mine = [p for p in found if os.path.abspath(p) in skip]
            if mine:
                logger.warning("skipping this run's own output file(s) found under %s: %s", path, mine)
            found = [p for p in found if os.path.abspath(p) not in skip]
            if not found:
                raise FileNotFoundError(f"{path}: folder has no {'/'.join(INPUT_SUFFIXES)} files")
            files += found
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def absolute_video(video: str, json_file: Path, video_root: Path | None) -> str:
    """``video`` as an absolute, normalised path; relative ones resolve against ``video_root`` or the JSON's
    folder. Symlinks are not followed, so a path through a linked ``LLaVA-Video-178K`` folder keeps that name."""
    p = Path(video).expanduser()
    if not p.is_absolute():
        p = (video_root if video_root is not None else json_file.parent) / p
    return os.path.abspath(p)


def text_problem(record: dict[str, Any], source: str, position: int) -> RecordError | None:
    """The first reason ``swim validate`` / the loaders would reject the record's text, or None."""
    try:
        rec = record_from_json(record, source=source, index=position)
    except RecordError as e:
        return e if e.code == "conversations" else RecordError(source, position, e.field, e.reason, "shape")
    if rec.kind != "chat":
        return RecordError(
            source,
            position,
            "<record>",
            f"read as a {rec.kind} record, not a LLaVA-Video chat record",
            "shape",
        )
    found = check_tags(rec) + check_control_tokens(rec)
    return found[0] if found else None


def normalise(obj: dict[str, Any], video: str, source: Path, video_root: Path | None) -> tuple[dict, bool]:
    """A copy of ``obj`` with its video absolute and a missing data_source filled; (record, filled)."""
    record = dict(obj)
    record["video"] = absolute_video(video, source, video_root)
    filled = not record.get("data_source")
    if filled:
        record["data_source"] = source.parent.name
    return record, filled


def prepare(obj: Any, source: Path, position: int, video_root: Path | None) -> Entry:
    """A `Candidate` (absolute video, data_source set) if the record passes the text checks, else `Rejected`."""
    src = str(source)
    if isinstance(
        obj, RecordError
    ):  # a .jsonl line that is not JSON, or the syntax error that ended an array
        return Rejected(src, position, None, None, obj.code, obj.reason)
    if not isinstance(obj, dict):
        detail = f"expected a JSON object, got {type(obj).__name__}"
        return Rejected(src, position, None, None, "shape", detail)
    rec_id, video = obj.get("id"), obj.get("video")
    if not isinstance(video, str) or not video.strip():
        if "video" in obj:
            detail = f"expected a non-empty path, got {video!r}"
        else:
            detail = "missing (an image record?)" if "image" in obj else "missing"
        return Rejected(src, position, rec_id, video, "no_video", detail)
    record, filled = normalise(obj, video, source, video_root)
    problem = text_problem(record, src, position)
    if problem is not None:
        detail = f"{problem.field}: {problem.reason}"
        return Rejected(src, position, rec_id, record["video"], problem.code, detail)
    return Candidate(src, position, record, filled)


def read_records(path: Path, *, log: bool = True) -> Iterator[tuple[int, Any]]:
    """Stream ``(position, object)`` from one input file with `iter_json_records` (the file is never loaded whole).

    A ``.jsonl`` line that is not JSON comes as a `RecordError` object (code ``json``), and so does a syntax
    error inside a ``.json`` array, at the position of the record that could not be read; that one ends the
    file (the records before it stand) and is logged as an error when ``log``. Raises `RecordError` for an
    unusable file: one that cannot be opened, or from which not even its first record can be read (not JSON,
    not an array or object, broken from the start).
    """
    records = iter_json_records(path, bad_lines="yield")
    with closing(records):
        n = 0
        while True:
            try:
                item = next(records, None)
            except RecordError as e:
                if e.code == "file" or n == 0:
                    raise
                position = n if e.index is None else e.index
                if log:
                    logger.error("%s: stopped reading at record %d: %s", path, position, e.reason)
                yield position, e
                return
            if item is None:
                return
            n += 1
            yield item


@dataclass
class Scan:
    """What the first pass keeps of the inputs: the distinct videos and a few bytes per record.

    ``video_of[k]`` is, for the k-th record read (over all files, in order; a record that could not be read
    counts), the index in ``videos`` (absolute path -> index, in order of first use) of its video, or -1 when
    the record was rejected on its text. ``counts[i]`` is the number of records read from ``files[i]``.
    """

    files: list[Path]
    video_root: Path | None
    counts: list[int] = field(default_factory=list)
    video_of: array = field(default_factory=lambda: array("i"))
    videos: dict[str, int] = field(default_factory=dict)

    @property
    def records_read(self) -> int:
        return len(self.video_of)


def scan_inputs(files: Sequence[Path], video_root: Path | None) -> Scan:
    """Pass 1: read every record once, run the text checks, collect the distinct videos (memory: `Scan`).
    Raises `RecordError` for an unusable file (see `read_records`)."""
    scan = Scan(list(files), video_root)
    videos, video_of = scan.videos, scan.video_of
    for path in scan.files:
        n = 0
        for position, obj in read_records(path):
            entry = prepare(obj, path, position, video_root)
            video_of.append(
                videos.setdefault(entry.video, len(videos)) if isinstance(entry, Candidate) else -1
            )
            n += 1
        scan.counts.append(n)
    return scan


# ---------------------------------------------------------------------------------------------------------
# Probing (runs in worker processes)


def _decode_error_code(e: VideoDecodeError) -> str:
    return "empty_video" if _NO_FRAMES.search(e.reason) else "unreadable_video"


def check_info(info: VideoInfo, limits: ProbeLimits) -> ProbeResult | None:
    """A failing verdict from the probed metadata alone (frames, fps, duration, aspect), or None."""
    n, fps, h, w = info.num_frames, info.fps, info.height, info.width
    fields = {"num_frames": n, "fps": fps, "height": h, "width": w}
    if n <= 0:
        return ProbeResult("empty_video", f"{n} frames", **fields)
    if fps <= 0 or h <= 0 or w <= 0:
        return ProbeResult("unreadable_video", f"unknown fps or size (fps {fps}, {w}x{h})", **fields)
    duration = n / fps
    if limits.max_seconds is not None and duration > limits.max_seconds:
        detail = f"{duration:.1f} s > {limits.max_seconds:g} s ({n} frames at {fps:.3g} fps)"
        return ProbeResult("too_long", detail, **fields)
    ratio = max(h, w) / min(h, w)
    if limits.max_aspect and ratio > limits.max_aspect:
        return ProbeResult("aspect_ratio", f"{w}x{h}: ratio {ratio:.1f} > {limits.max_aspect:g}", **fields)
    return None


def inspect_video(path: str, limits: ProbeLimits) -> ProbeResult:
    """Probe one video and decode its first, middle and last frames; raises on unexpected failures."""
    if not os.path.exists(path):
        return ProbeResult("missing_video", f"not found: {path}")
    settings = VideoSettings(decode_timeout_s=limits.decode_timeout_s)
    try:
        info = probe_video(path, settings)
    except VideoDecodeError as e:
        return ProbeResult(_decode_error_code(e), e.reason)
    bad = check_info(info, limits)
    if bad is not None:
        return bad
    fields = {"num_frames": info.num_frames, "fps": info.fps, "height": info.height, "width": info.width}
    indices = sorted({0, info.num_frames // 2, info.num_frames - 1})
    try:
        frames = read_frames(path, indices, settings)
    except VideoDecodeError as e:
        return ProbeResult("unreadable_video", f"frames {indices}: {e.reason}", **fields)
    if frames.shape[0] != len(indices):
        return ProbeResult("unreadable_video", f"frames {indices}: got {frames.shape[0]}", **fields)
    return ProbeResult(None, "", **fields)


def probe_one(path: str, limits: ProbeLimits) -> ProbeResult:
    """`inspect_video` that never raises: any error becomes ``unreadable_video`` with its class and message."""
    try:
        return inspect_video(path, limits)
    except Exception as e:
        return ProbeResult("unreadable_video", f"{type(e).__name__}: {e}")


def _pool_context() -> multiprocessing.context.BaseContext | None:
    """fork where available: workers inherit the imported modules (no torch re-import per worker)."""
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def _pool_round(paths: Sequence[str], limits: ProbeLimits, workers: int, results: dict, bar) -> list[str]:
    """Probe ``paths`` in one pool; returns those lost to a worker that died (in submission order)."""
    lost: list[str] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        futures: dict[Future, str] = {pool.submit(probe_one, p, limits): p for p in paths}
        for fut in as_completed(futures):
            try:
                results[futures[fut]] = fut.result()
                bar.update(1)
            except BrokenProcessPool:
                lost.append(futures[fut])
    order = {p: i for i, p in enumerate(paths)}
    return sorted(lost, key=order.__getitem__)


def _probe_alone(path: str, limits: ProbeLimits) -> ProbeResult:
    """Probe one video in its own process, so that a decoder crash is pinned on it."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=_pool_context()) as pool:
            return pool.submit(probe_one, path, limits).result()
    except BrokenProcessPool as e:
        return ProbeResult("unreadable_video", f"the probing process died (decoder crash?): {e}")


def probe_videos(paths: Sequence[str], limits: ProbeLimits, workers: int) -> dict[str, ProbeResult]:
    """Verdict per distinct video, ``workers`` processes (1: in this process), with a progress bar.

    A worker that dies (a decoder segfault) breaks the pool and every unfinished video with it: those that
    could have been running (the first ``2 * workers + 1`` lost, since work is handed out in order) are then
    probed one per process, and the rest go back to a fresh pool.
    """
    from tqdm import tqdm

    results: dict[str, ProbeResult] = {}
    with tqdm(total=len(paths), desc="probe videos", unit="video", dynamic_ncols=True) as bar:
        if workers <= 1:
            for p in paths:
                results[p] = probe_one(p, limits)
                bar.update(1)
            return results
        pending = list(paths)
        while pending:
            lost = _pool_round(pending, limits, workers, results, bar)
            suspects, pending = lost[: 2 * workers + 1], lost[2 * workers + 1 :]
            if suspects:
                logger.warning("a probing process died; probing %d video(s) one by one", len(suspects))
            for p in suspects:
                results[p] = _probe_alone(p, limits)
                bar.update(1)
    return results


# ---------------------------------------------------------------------------------------------------------
# Subset and outputs


def draw_subset(n_valid: int, num: int | None, seed: int) -> np.ndarray | None:
    """Sorted ordinals (int64) of a seeded random subset of ``num`` of ``n_valid`` valid records, or None for
    all of them (num None or not smaller than n_valid)."""
    if num is None or num >= n_valid:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_valid, size=num, replace=False))


def select_subset(n_valid: int, num: int | None, seed: int) -> list[int]:
    """Sorted positions of a seeded random subset of ``num`` of ``n_valid`` records (all when num is None or
    not smaller than n_valid)."""
    chosen = draw_subset(n_valid, num, seed)
    return list(range(n_valid)) if chosen is None else [int(i) for i in chosen]


def subset_picker(n_valid: int, num: int | None, seed: int) -> Callable[[int], bool]:
    """``keep(ordinal)`` for the valid records: the `draw_subset` choice as one byte per valid record."""
    chosen = draw_subset(n_valid, num, seed)
    if chosen is None:
        return lambda _: True
    mask = np.zeros(n_valid, dtype=np.uint8)
    mask[chosen] = 1
    flags = mask.tobytes()
    return flags.__getitem__


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicFile:
    """A text file written line by line to a temporary file beside ``path``: `commit` renames it over
    ``path``, `discard` (a no-op after `commit`) removes it."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, _tmp_path(path)
        self.fh = self.tmp.open("w", encoding="utf-8")

    def commit(self) -> None:
        self.fh.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def json_array_text(records: Sequence[dict[str, Any]]) -> str:
    """A JSON array with one record per line (valid JSON, diff-friendly), as `swim.data.synth` writes and as
    `write_results` streams it."""
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def warn_official_paths(n_unofficial: int, n_kept: int) -> None:
    """Warn once if ``n_unofficial`` of the ``n_kept`` output video paths lack the ``LLaVA-Video-178K`` folder."""
    if n_unofficial:
        logger.warning(
            "%d of %d output video paths do not contain %r: SWIM's official training code exits on such "
            "LLaVA-Video records, swim's own loader does not need it. For the official code, keep the videos "
            "under a folder named %s (--video-root through it).",
            n_unofficial, n_kept, OFFICIAL_DIR, OFFICIAL_DIR,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swim data filter-videos",
        description=__doc__.split("\n\n")[0],
        epilog="Reason codes: " + "; ".join(f"{k}: {v}" for k, v in REASONS.items()),
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IN", help=".json / .jsonl files or folders")
    parser.add_argument("--out", required=True, type=Path, help="output JSON array (OUT.json)")
    parser.add_argument(
        "--video-root",
        type=Path,
        default=None,
        help="relative videos resolve here (default: each JSON's folder)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="drop longer videos (default: no limit)"
    )
    parser.add_argument(
        "--max-aspect",
        type=float,
        default=12.0,
        help="drop videos wider or taller than this ratio (0: no limit)",
    )
    parser.add_argument("--num", type=int, default=None, help="keep a random subset of N valid records")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --num subset (numpy default_rng)")
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="probing processes (1: in-process)"
    )
    parser.add_argument("--decode-timeout", type=float, default=60.0, help="seconds allowed per video decode")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any record was dropped")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num is not None and args.num < 0:
        parser.error("--num must be >= 0")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.max_aspect and args.max_aspect < 1:
        parser.error("--max-aspect must be >= 1 (or 0 for no limit)")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error("--max-seconds must be > 0")


def count_valid(scan: Scan, verdicts: Sequence[ProbeResult]) -> int:
    """How many records passed the text checks and use a valid video."""
    ok = bytes(p.code is None for p in verdicts)
    return sum(1 for vi in scan.video_of if vi >= 0 and ok[vi])


def _changed(path: Path, position: int) -> RecordError:
    return RecordError(path, position, "<file>", "the file changed while it was being filtered", "file")


def iter_results(scan: Scan, verdicts: Sequence[ProbeResult], keep: Callable[[int], bool]) -> Iterator[Entry]:
    """Pass 2: read the inputs again and yield, in input order, a `Rejected` per dropped record and a
    `Candidate` per kept one (``keep(i)`` for the i-th valid record; the others are not built). Raises
    `RecordError` if a file no longer reads as it did in pass 1."""
    names = list(scan.videos)
    k = n_valid = 0
    for path, count in zip(scan.files, scan.counts):
        src, n = str(path), 0
        with closing(read_records(path, log=False)) as records:
            for _, (position, obj) in zip(range(count), records):  # range first: stops without reading on
                vi = scan.video_of[k]
                k, n = k + 1, n + 1
                if vi < 0:  # rejected on its text: derived again (deterministic)
                    entry = prepare(obj, path, position, scan.video_root)
                    if not isinstance(entry, Rejected):
                        raise _changed(path, position)
                    yield entry
                    continue
                video = obj.get("video") if isinstance(obj, dict) else None
                if not isinstance(video, str) or absolute_video(video, path, scan.video_root) != names[vi]:
                    raise _changed(path, position)
                verdict = verdicts[vi]
                if verdict.code is not None:
                    yield Rejected(src, position, obj.get("id"), names[vi], verdict.code, verdict.detail)
                    continue
                if keep(n_valid):
                    record, filled = normalise(obj, video, path, scan.video_root)
                    yield Candidate(src, position, record, filled)
                n_valid += 1
        if n != count:
            raise _changed(path, n)


@dataclass
class Written:
    """Counts of what `write_results` wrote (``unofficial``: kept paths without ``LLaVA-Video-178K``)."""

    kept: int = 0
    data_source_filled: int = 0
    unofficial: int = 0
    by_reason: Counter = field(default_factory=Counter)


def write_results(results: Iterable[Entry], kept_fh, rejected_fh) -> Written:
    """Stream kept records into a JSON array (the bytes of `json_array_text`) and rejected lines as JSONL."""
    done = Written()
    for item in results:
        if isinstance(item, Rejected):
            done.by_reason[item.code] += 1
            rejected_fh.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
            continue
        kept_fh.write(("[\n" if done.kept == 0 else ",\n") + json.dumps(item.record, ensure_ascii=False))
        done.kept += 1
        done.data_source_filled += item.filled
        done.unofficial += OFFICIAL_DIR not in item.video
    kept_fh.write("\n]\n" if done.kept else "[]\n")
    return done


def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        return [conv(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v

    return {k: conv(v) for k, v in vars(args).items()}


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    start = time.perf_counter()
    rejected_path, stats_path = side_paths(args.out)
    limits = ProbeLimits(args.max_seconds, args.max_aspect or None, args.decode_timeout)

    try:
        files = expand_inputs(args.inputs, exclude=(args.out, rejected_path, stats_path))
        scan = scan_inputs(files, args.video_root)
    except (FileNotFoundError, RecordError) as e:
        logger.error("unusable input: %s", e)
        sys.exit(2)
    n_read = scan.records_read
    videos = list(scan.videos)
    logger.info(
        "read %d records from %d file(s); %d distinct videos to probe", n_read, len(files), len(videos)
    )

    probes = probe_videos(videos, limits, args.workers)
    verdicts = [probes[v] for v in videos]
    n_valid = count_valid(scan, verdicts)
    keep = subset_picker(n_valid, args.num, args.seed)
    if args.num is not None and args.num > n_valid:
        logger.warning("--num %d but only %d valid records: keeping all of them", args.num, n_valid)

    rejected_file, kept_file = AtomicFile(rejected_path), AtomicFile(args.out)
    try:
        done = write_results(iter_results(scan, verdicts, keep), kept_file.fh, rejected_file.fh)
        n_dropped = sum(done.by_reason.values())
        warn_official_paths(done.unofficial, done.kept)
        stats = {
            "inputs": [str(f) for f in files],
            "records_read": n_read,
            "valid": n_valid,
            "kept": done.kept,
            "dropped": n_dropped,
            "dropped_by_reason": dict(sorted(done.by_reason.items())),
            "data_source_filled": done.data_source_filled,  # among the kept records
            "unique_videos": len(videos),
            "videos_by_verdict": dict(sorted(Counter(p.code or "valid" for p in verdicts).items())),
            "paths_without_llava_video_178k": done.unofficial,
            "seconds": round(time.perf_counter() - start, 3),
            "args": _jsonable(args),
        }
        rejected_file.commit()
        kept_file.commit()
        write_atomic(stats_path, json.dumps(stats, indent=1) + "\n")
    except RecordError as e:
        logger.error("unusable input: %s", e)
        sys.exit(2)
    finally:
        rejected_file.discard()
        kept_file.discard()

    reasons = ", ".join(f"{k}: {v}" for k, v in done.by_reason.most_common()) or "none"
    logger.info(
        "filter-videos: %d records from %d file(s) -> %d kept (%d valid), %d dropped (%s), %d unique videos, "
        "%.1f s -> %s",
        n_read, len(files), done.kept, n_valid, n_dropped, reasons, len(videos), stats["seconds"], args.out,
    )  # fmt: skip
    if args.strict and n_dropped:
        sys.exit(1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
