"""Synthetic shapes videos written in the *raw* VideoRefer formats (``swim data synth OUT_DIR --format videorefer``).

The input side of NL-Refer construction (``swim data build``), for tests and demos without the real data:
the same scenes as `swim.data.synth.shapes` (coloured shapes moving on black, exact masks), but with the
``<region>`` / ``<objectN><region>`` visual-prompt placeholders of the released files instead of
``<ins>``-tagged natural language. Writes into OUT_DIR:

- ``videorefer-detailed-caption.json`` (``--num-train`` records): one ``<region>`` in the human turn, a
  placeholder-free description in the gpt turn;
- ``videorefer-qa.json`` (``--num-val``): even positions ask about one ``<region>``, odd ones use the
  multi-object form ``There are 2 objects in the video: <object0><region>, <object1><region>.\\n...`` with an
  answer that back-references ``<object0>`` / ``<object1>``;
- ``VideoRefer-Bench-D.json`` (``--num-bench-d``): ``caption`` + ``frame_idx``;
- ``VideoRefer-Bench-Q.json`` (``--num-bench-q``): ``Question`` with ``<objectN><region>`` whose ids are not
  the annotation indices (e.g. ``<object3>`` owns ``annotation[0]``), ``type``, ``options``, ``Answer``,
  ``frame_idx``;
- ``scenes.json``: record ``id`` -> ``[{"colour", "shape", "direction"}, ...]`` in annotation order, for every
  record of every file (a stand-in LLM reads it to answer a rewrite request deterministically);
- ``videos/*.mp4`` (Bench-Q as JPEG frame folders with ``--bench-q-frame-folders``).

Every record has a unique string ``id``, ``height``/``width``, ``ratio`` 1.0 and compressed-RLE masks. Each
record draws from its own RNG seeded by (seed, file, position): the output is deterministic per seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from swim.data.synth.shapes import (
    BENCH_Q_TYPES,
    MOVES,
    SceneObject,
    SynthConfig,
    _pick,
    annotated_frames,
    annotation_of,
    bench_q_question,
    caption_of,
    sample_scene,
    write_scene,
)

# output file name per count key (the flags of `swim data synth`: --num-train, --num-val, --num-bench-d, ...)
FILES = {
    "detailed": "videorefer-detailed-caption.json",
    "qa": "videorefer-qa.json",
    "bench_d": "VideoRefer-Bench-D.json",
    "bench_q": "VideoRefer-Bench-Q.json",
}
SCENES_FILE = "scenes.json"
_FILE_IDS = {
    "detailed": 10,
    "qa": 11,
    "bench_d": 12,
    "bench_q": 13,
}  # RNG streams, apart from synth.SPLIT_IDS
DETAILED_QUESTIONS = (
    "Please describe <region> in detail.",
    "Describe <region> in the video in detail.",
    "What does <region> do in the video? Please describe it in detail.",
)
SINGLE_QA = "In which direction does <region> move?"
PAIR_QA = (
    "There are 2 objects in the video: <object0><region>, <object1><region>.\n"
    "How does <object0> move compared with <object1>?"
)


def _scene(obj: SceneObject) -> dict[str, str]:
    return {"colour": obj.colour, "shape": obj.shape, "direction": obj.direction}


def _detailed(rng: np.random.Generator, objects: list[SceneObject], cfg: SynthConfig) -> tuple[dict, list]:
    a = objects[0]
    question = "<video>\n" + _pick(rng, DETAILED_QUESTIONS)
    record = {
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": caption_of(objects, cfg)},
        ],
        "annotation": [annotation_of(a, annotated_frames(rng, cfg))],
    }
    return record, [a]


def _qa(i: int, objects: list[SceneObject], cfg: SynthConfig) -> tuple[dict, list]:
    a = objects[0]
    if i % 2 == 0 or len(objects) < 2:
        question, answer, referred = SINGLE_QA, f"It moves {MOVES[a.direction]}.", [a]
    else:
        b = objects[1]
        relation = "while" if a.direction != b.direction else "and so does"
        tail = f"<object1> moves {MOVES[b.direction]}" if relation == "while" else "<object1>"
        question, referred = PAIR_QA, [a, b]
        answer = f"<object0> moves {MOVES[a.direction]} {relation} {tail}."
    record = {
        "conversations": [
            {"from": "human", "value": "<video>\n" + question},
            {"from": "gpt", "value": answer},
        ],
        "annotation": [annotation_of(o) for o in referred],
    }
    return record, referred


def _bench_q(
    rng: np.random.Generator, i: int, objects: list[SceneObject], cfg: SynthConfig
) -> tuple[dict, list]:
    kind = BENCH_Q_TYPES[i % len(BENCH_Q_TYPES)]
    question, options, answer, referred = bench_q_question(rng, kind, objects, cfg)
    # object ids that are not the annotation indices, as in the real benchmark (<object3> owns annotation[0])
    ids = [int(n) for n in rng.choice(np.arange(1, 10), size=len(referred), replace=False)]
    for obj, n in zip(referred, ids, strict=True):
        question = question.replace(f"the {obj.tagged()}", f"<object{n}><region>", 1)
    if "<ins>" in question:
        raise AssertionError(f"untranslated tag in {question!r}")
    record = {
        "Question": question,
        "type": kind,
        "options": options,
        "Answer": answer,
        "frame_idx": str(cfg.frames // 2),
        "annotation": [annotation_of(o) for o in referred],
    }
    return record, referred


def _bench_d(objects: list[SceneObject], cfg: SynthConfig) -> tuple[dict, list]:
    record = {
        "caption": caption_of(objects, cfg),
        "frame_idx": str(cfg.frames // 2),
        "annotation": [annotation_of(objects[0])],
    }
    return record, [objects[0]]


def generate_videorefer(
    out_dir: str | Path, cfg: SynthConfig, seed: int, counts: dict[str, int]
) -> dict[str, Path]:
    """Write the raw-format files for ``counts`` ({"detailed": N, "qa": M, "bench_d": K, "bench_q": L}), the
    videos and ``scenes.json``; -> count key (and "scenes") -> path."""
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(counts) - set(FILES))
    if unknown:
        raise ValueError(f"unknown record kinds {unknown}; expected some of {sorted(FILES)}")
    scenes: dict[str, list[dict[str, str]]] = {}
    paths: dict[str, Path] = {}
    for key, count in counts.items():
        records = []
        for i in range(count):
            rng = np.random.default_rng([seed, _FILE_IDS[key], i])
            objects, video = sample_scene(rng, cfg)
            rid = f"synth_{key}_{i:05d}"
            rel = write_scene(
                out, rid, video, cfg, frame_folder=key == "bench_q" and cfg.bench_q_frame_folders
            )
            if key == "detailed":
                body, referred = _detailed(rng, objects, cfg)
            elif key == "qa":
                body, referred = _qa(i, objects, cfg)
            elif key == "bench_q":
                body, referred = _bench_q(rng, i, objects, cfg)
            else:
                body, referred = _bench_d(objects, cfg)
            records.append(
                {
                    "id": rid,
                    "video": rel,
                    **body,
                    "height": cfg.frame_height,
                    "width": cfg.size,
                    "ratio": 1.0,
                }
            )
            scenes[rid] = [_scene(o) for o in referred]
        paths[key] = out / FILES[key]
        # one record per line: valid JSON, diff-friendly, compact RLE
        paths[key].write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    paths["scenes"] = out / SCENES_FILE
    paths["scenes"].write_text(json.dumps(scenes, indent=1) + "\n")
    (out / "synth_config.json").write_text(
        json.dumps({"seed": seed, "format": "videorefer", "counts": counts, **asdict(cfg)}, indent=1)
    )
    return paths
