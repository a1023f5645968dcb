"""lmms-eval tasks on local Bench-Q-format files (no Hugging Face Hub): the shared code of
``swim_synth_bench_q.yaml`` and ``videorefer_bench_q_nl.yaml``.

Where the data is read from, without editing a YAML: each task loads a one-row *source* file
(``sources/<task>.json``, via lmms-eval's ``dataset_path: json``) that names environment variables, and
`process_docs` replaces that row by the questions they point to:

- ``json_env``: the Bench-Q JSON, or the folder that holds it under the name ``json_name``;
- ``videos_env`` (optional): the folder the records' ``video`` paths are relative to (default: the JSON's folder).

(A task class that reads the files itself, as some lmms-eval tasks do, would only work with lmms-eval's "simple"
models: ``--model qwen2_5_vl`` resolves to the chat model in lmms-eval 0.7, which needs lmms-eval's own
message-task class. Plain YAML tasks get the right class for either.)

Prompt and scoring are the project's own (`swim.eval.bench_q`): the same ``<ins>`` tag stripping, the same
prompt (question, options one per line, "Answer with the option's letter ..."), the same answer-letter parser
and the same accuracy as ``swim eval bench-q``. Malformed records are left out, as there, with a warning; a
missing video stops the run before any generation, naming the file.

lmms-eval's simple ``qwen2_5_vl`` model reads a visual as a video only when it is a ``.mp4``/``.avi``/``.mov``
path (anything else is dropped without a word), and its chat model reads a path with decord, which does not
read frame folders. So a frame folder (VideoRefer-Bench-Q's DAVIS clips) or another container is encoded once
into an mp4 under ``$SWIM_LMMS_VIDEO_CACHE`` (default ``~/.cache/swim/lmms_videos``); a frame folder plays at
``$SWIM_LMMS_FOLDER_FPS`` (default 24, DAVIS-2017's rate, as in `swim.data.video`).

lmms-eval loads this file from its path (``!function utils.x``), so it imports nothing from its own folder, and
nothing from lmms-eval: the project's main venv imports it for tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from swim.data.records import BENCH_Q_TYPES
from swim.data.video import VideoSettings, probe_video, read_frames, write_video
from swim.eval.bench_q import QItem, build_items, load_bench, score, summarize

try:  # lmms-eval's own logger, so that the messages appear in its log
    from loguru import logger
except ImportError:  # the project's main venv
    logger = logging.getLogger(__name__)

LMMS_VIDEO_SUFFIXES = (".mp4", ".avi", ".mov")  # what lmms-eval's qwen2_5_vl treats as a video file
VIDEO_CACHE_ENV = "SWIM_LMMS_VIDEO_CACHE"
FOLDER_FPS_ENV = "SWIM_LMMS_FOLDER_FPS"
CACHE_CRF = 12  # libx264 quality of the cached mp4s (visually lossless)


# ---------------------------------------------------------------------------------------------------------
# Where the data is


def resolve_paths(source: Mapping[str, Any], task: str = "task") -> tuple[Path, Path]:
    """(JSON file, video root) from the environment variables a source row names."""
    json_env, json_name = source.get("json_env"), source.get("json_name")
    videos_env = source.get("videos_env")
    if not json_env:
        raise ValueError(f"{task}: the source row has no json_env (the variable naming the Bench-Q JSON)")
    value = os.environ.get(json_env, "").strip()
    if not value:
        raise ValueError(
            f"{task}: set {json_env} to the Bench-Q JSON"
            + (f" or to the folder holding {json_name}" if json_name else "")
        )
    path = Path(value).expanduser()
    if path.is_dir():
        if not json_name:
            raise ValueError(f"{task}: {json_env}={value} is a folder; point it at the JSON file")
        path = path / json_name
    if not path.is_file():
        raise FileNotFoundError(f"{task}: {json_env}={value}: no such file {path}")
    root_value = os.environ.get(videos_env, "").strip() if videos_env else ""
    root = Path(root_value).expanduser() if root_value else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"{task}: {videos_env}={root_value}: no such folder")
    return path.resolve(), root.resolve()


def load_docs(json_path: str | Path, video_root: str | Path | None = None) -> list[dict[str, Any]]:
    """One flat document per scorable question (`swim.eval.bench_q.QItem` fields; ``id`` as a string so that
    Arrow gets one column type). Raises when no question is usable or when any video is missing."""
    records, problems = load_bench(json_path, "bench_q", video_root)
    items, invalid = build_items(records)
    invalid = problems + invalid
    if invalid:
        first = invalid[0]
        logger.warning(
            f"{json_path}: {len(invalid)} malformed record(s) left out of the accuracy "
            f"(first: record {first['index']}, {first['field']}: {first['reason']})"
        )
    if not items:
        raise ValueError(f"{json_path}: no scorable Bench-Q question ({len(invalid)} malformed record(s))")
    missing = [it.video for it in items if not Path(it.video).exists()]
    if missing:
        raise FileNotFoundError(
            f"{json_path}: {len(missing)} of {len(items)} videos are missing under {video_root} "
            f"(first: {missing[0]}); is the video folder right?"
        )
    docs = []
    for it in items:
        doc = dataclasses.asdict(it)
        doc["id"] = "" if it.id is None else str(it.id)
        doc["video"] = str(Path(it.video).resolve())
        docs.append(doc)
    logger.info(f"{json_path}: {len(docs)} questions, videos under {video_root}")
    return docs


def process_docs(sources):
    """lmms-eval's ``process_docs``: the one-row source file (a `datasets.Dataset`) -> the questions it names."""
    import datasets

    if len(sources) != 1:
        raise ValueError(f"a source file must hold exactly one row, got {len(sources)}")
    source = sources[0]
    json_path, video_root = resolve_paths(source, source.get("task") or "task")
    return datasets.Dataset.from_list(load_docs(json_path, video_root))


# ---------------------------------------------------------------------------------------------------------
# Videos lmms-eval's qwen2_5_vl can read


def _cache_dir() -> Path:
    value = os.environ.get(VIDEO_CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "swim" / "lmms_videos"


def _folder_fps() -> float:
    value = os.environ.get(FOLDER_FPS_ENV, "").strip()
    try:
        fps = float(value) if value else VideoSettings().folder_fps
    except ValueError:
        raise ValueError(f"{FOLDER_FPS_ENV}={value!r} is not a number") from None
    if fps <= 0:
        raise ValueError(f"{FOLDER_FPS_ENV}={value!r} must be positive")
    return fps


def _fingerprint(path: Path, fps: float) -> str:
    """Changes when the source (a file, or a folder's files) or the frame rate does."""
    h = hashlib.sha256(f"{path.resolve()}|{fps}".encode())
    for p in sorted(path.iterdir()) if path.is_dir() else [path]:
        st = p.stat()
        h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad odd heights/widths by repeating the last row/column (yuv420p needs even sides)."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


def as_lmms_video(path: str | Path) -> str:
    """A path lmms-eval's qwen2_5_vl reads as a video: the file itself when it is an mp4/avi/mov, else an mp4
    encoded once (frame folder at `_folder_fps`, another container at its own rate) into the cache."""
    src = Path(path)
    if src.is_file() and src.suffix.lower() in LMMS_VIDEO_SUFFIXES:
        return str(src)
    if not src.exists():
        raise FileNotFoundError(f"no such video file or frame folder: {src}")
    settings = VideoSettings(folder_fps=_folder_fps())
    out = _cache_dir() / f"{src.name or 'video'}-{_fingerprint(src, settings.folder_fps)}.mp4"
    if out.is_file():
        return str(out)
    info = probe_video(src, settings)
    frames = _even(read_frames(src, list(range(info.num_frames)), settings))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=out.parent)  # atomic: several ranks may convert at once
    os.close(fd)
    try:
        write_video(tmp, frames, info.fps or settings.folder_fps, crf=CACHE_CRF)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info(f"encoded {src} ({info.num_frames} frames at {info.fps:g} fps) as {out}")
    return str(out)


# ---------------------------------------------------------------------------------------------------------
# lmms-eval's document functions (`!function utils.x` in the YAMLs)


def doc_to_visual(doc: Mapping[str, Any]) -> list[str]:
    return [as_lmms_video(doc["video"])]


def doc_to_text(doc: Mapping[str, Any]) -> str:
    """The prompt `swim.eval.bench_q.build_items` made (tags stripped, options, the answer instruction)."""
    return doc["prompt"]


def doc_to_target(doc: Mapping[str, Any]) -> str:
    return doc["gt"]


def _item(doc: Mapping[str, Any]) -> QItem:
    return QItem(**{f.name: doc[f.name] for f in dataclasses.fields(QItem)})


def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One `swim.eval.bench_q.score` prediction per metric. ``score`` (100 or 0) lets lmms-eval compute the
    accuracy's CLT standard error; the per-type metrics carry none (their stderr would mix the types)."""
    raw = results[0] if results else ""
    (prediction,), _ = score([_item(doc)], {doc["key"]: {"text": raw}})
    out = {"accuracy": {**prediction, "score": 100.0 if prediction["correct"] else 0.0}}
    out.update({type_metric(t): prediction for t in BENCH_Q_TYPES})
    return out


def type_metric(question_type: str) -> str:
    """``"Basic Questions"`` -> ``"basic_questions"``: the metric name of a question type."""
    return question_type.lower().replace(" ", "_")


def aggregate_accuracy(predictions: Sequence[dict[str, Any]]) -> float | None:
    """Accuracy in percent over all questions (`swim.eval.bench_q.summarize`); logs the per-type table."""
    summary = summarize(predictions)
    logger.info(
        f"Bench-Q accuracy {summary['accuracy']} over {summary['n_questions']} questions "
        f"({summary['n_correct']} correct, {summary['n_parse_failures']} unparsed answers counted wrong)"
    )
    for t, r in summary["per_type"].items():
        logger.info(f"  {t}: {r['accuracy']} ({r['correct']}/{r['n']})")
    return summary["accuracy"]


def _type_aggregator(question_type: str):
    def aggregate(predictions: Sequence[dict[str, Any]]) -> float | None:
        r = summarize(predictions)["per_type"].get(question_type)
        return None if r is None else r["accuracy"]

    aggregate.__name__ = f"aggregate_{type_metric(question_type)}"
    return aggregate


aggregate_basic_questions = _type_aggregator("Basic Questions")
aggregate_sequential_questions = _type_aggregator("Sequential Questions")
aggregate_relationship_questions = _type_aggregator("Relationship Questions")
aggregate_reasoning_questions = _type_aggregator("Reasoning Questions")
aggregate_future_predictions = _type_aggregator("Future Predictions")
