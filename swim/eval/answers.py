"""Answer accuracy on task records (KLAL's tasks): generate, parse, score, and say what chance would get.

    swim eval answers --model DIR --data FILE [--out DIR] [--scorer exact|count|point|box] [--limit N]
                      [--batch-size 16 --max-new-tokens 16 --system-prompt "You are a helpful assistant."]

For every record the first user turn (tags removed) is asked about the record's image(s) or video, the answer is
generated greedily (`swim.eval.generate`, the same preprocessing as training) and scored against the record by
its `scorer` (written by `swim data synth --task`, or `--scorer` for every record):

- `exact`: the normalised answer (case, surrounding spaces, a final period) equals the reference (`C5`, `3`);
- `count`: the first integer in the answer equals the reference count;
- `point`: the first two numbers, read as `(x, y)` pixels, fall inside the object (its `scene[0].box`, else the
  annotation's box; a point on the edge counts);
- `box`: the first four numbers, read as `[x0, y0, x1, y1]`, overlap the annotated box with IoU >= 0.5.

An answer the scorer cannot parse (no integer, fewer numbers than needed) is a parse failure: wrong, and counted
separately; a generation error is counted too. Chance levels are reported beside the accuracy
(`chance_levels`): the majority answer, the most common answer of each question text (a language prior), a
uniform guess over the record's `choices`, the shortcuts of a model that finds only the named colour or only the
named shape (a random object of that colour / shape: `scene`), a uniformly random point, and a box of the right
size at a uniformly random place (seeded Monte Carlo).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from swim.data.records import iter_json_objects, load_records

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_INTEGER = re.compile(r"-?\d+")


def _normalise(text: str) -> str:
    return " ".join(text.strip().casefold().rstrip(".").split())


def _numbers(text: str, n: int) -> list[float] | None:
    found = [float(x) for x in _NUMBER.findall(text)]
    return found[:n] if len(found) >= n else None


def reference_answer(record: dict) -> str:
    return record["conversations"][1]["value"]


def target_box(record: dict) -> list[float] | None:
    """The referred object's box: `scene[0].box`, else the first annotated box."""
    scene = record.get("scene") or []
    if scene and "box" in scene[0]:
        return scene[0]["box"]
    for obj in record.get("annotation", []):
        for entry in obj.values():
            if "box" in entry:
                return entry["box"]
    return None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_exact(answer: str, record: dict) -> bool | None:
    return _normalise(answer) == _normalise(reference_answer(record))


def score_count(answer: str, record: dict) -> bool | None:
    found = _INTEGER.search(answer)
    return None if found is None else int(found.group()) == int(reference_answer(record))


def score_point(answer: str, record: dict) -> bool | None:
    point, box = _numbers(answer, 2), target_box(record)
    if box is None:
        raise ValueError("the point scorer needs the object's box (scene[0].box or a box annotation)")
    return None if point is None else box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def score_box(answer: str, record: dict) -> bool | None:
    box, truth = _numbers(answer, 4), target_box(record)
    if truth is None:
        raise ValueError("the box scorer needs a box annotation")
    return None if box is None else box_iou(box, truth) >= 0.5


SCORERS: dict[str, Callable[[str, dict], bool | None]] = {
    "exact": score_exact,
    "count": score_count,
    "point": score_point,
    "box": score_box,
}


def _one_attribute_guess(scene: list[dict], attribute: str, answer_key: str | None) -> float:
    """P(right) of a model that sees only `attribute` of the named object (scene[0]): it picks one of the objects
    sharing it at random and answers with that object's `answer_key` (say its size), or, without a key, with that
    object itself (its cell)."""
    same = [o for o in scene if o[attribute] == scene[0][attribute]]
    if answer_key is None:
        return 1 / len(same)
    return sum(o[answer_key] == scene[0][answer_key] for o in same) / len(same)


def question_only(records: Sequence[dict]) -> float:
    """Accuracy of the most common answer of each question text over these records: the best a model that reads
    the question but not the image can do here (a language prior; an upper estimate, fitted on the records)."""
    by_question: dict[str, Counter] = {}
    for record in records:
        question = record["conversations"][0]["value"]
        by_question.setdefault(question, Counter())[_normalise(reference_answer(record))] += 1
    return sum(c.most_common(1)[0][1] for c in by_question.values()) / len(records)


def chance_levels(records: Sequence[dict], samples: int = 200, seed: int = 0) -> dict[str, float]:
    """Accuracy of guesses that do not look (or look only at colour / shape), over these records."""
    out: dict[str, float] = {}
    answers = Counter(_normalise(reference_answer(r)) for r in records)
    out["majority answer"] = answers.most_common(1)[0][1] / len(records)
    out["question only"] = question_only(records)
    if all("choices" in r for r in records):
        out["uniform guess"] = float(np.mean([1 / r["choices"] for r in records]))
    scenes = [r.get("scene") or [] for r in records]
    keys = [r.get("answer_key") for r in records]
    if all(s and {"colour", "shape"} <= set(s[0]) for s in scenes):
        for attribute in ("colour", "shape"):
            out[f"{attribute} only"] = float(np.mean([
                _one_attribute_guess(scene, attribute, key) for scene, key in zip(scenes, keys)
            ]))  # fmt: skip
    boxes = [target_box(r) for r in records]
    scorers = {r.get("scorer") for r in records}
    if scorers == {"point"} and all(boxes):
        out["random point"] = float(np.mean([
            (b[2] - b[0]) * (b[3] - b[1]) / (r["width"] * r["height"]) for b, r in zip(boxes, records)
        ]))  # fmt: skip
    if scorers == {"box"} and all(boxes):
        rng = np.random.default_rng(seed)
        hits = []
        for b, r in zip(boxes, records):
            w, h = b[2] - b[0], b[3] - b[1]
            x0 = rng.uniform(0, r["width"] - w, samples)
            y0 = rng.uniform(0, r["height"] - h, samples)
            hits += [box_iou((x, y, x + w, y + h), b) >= 0.5 for x, y in zip(x0, y0)]
        out["random box of the right size"] = float(np.mean(hits))
    return out


def score_answers(records: Sequence[dict], answers: dict[str, str | None], scorer: str | None = None) -> dict:
    """Score generated `answers` (record key -> text, None for a generation error) -> summary and per-record
    rows. Keys are the records' positions as strings."""
    rows, counts = [], Counter()
    for i, record in enumerate(records):
        name = scorer or record.get("scorer") or "exact"
        answer = answers.get(str(i))
        if answer is None:
            verdict, status = False, "error"
        else:
            verdict = SCORERS[name](answer, record)
            status = "parse_failure" if verdict is None else ("correct" if verdict else "wrong")
        counts[status] += 1
        rows.append({"index": i, "scorer": name, "answer": answer, "reference": reference_answer(record),
                     "status": status})  # fmt: skip
    n = len(records)
    return {
        "records": n,
        "accuracy": counts["correct"] / n if n else float("nan"),
        "correct": counts["correct"],
        "parse_failures": counts["parse_failure"],
        "errors": counts["error"],
        "chance": chance_levels(records) if n else {},
        "rows": rows,
    }


def generate_answers(loaded, data: str | Path, video_settings, settings, limit: int | None = None,
                     data_root: str | None = None) -> tuple[list[dict], dict[str, str | None]]:  # fmt: skip
    """(raw records, answers by position) for the records of `data` (their first question, generated)."""
    from swim.eval.bench_q import clean_text
    from swim.eval.generate import Generator, GenItem

    raw = [obj for _, obj in iter_json_objects(data)][:limit]
    typed, problems = load_records(data, data_root=data_root, errors="collect")
    if problems:
        raise ValueError(
            f"{data}: {len(problems)} malformed record(s), first: {problems[0]} (run swim validate)"
        )
    items = []
    for i, record in enumerate(typed[: len(raw)]):
        kind, files = record.media_files
        question = clean_text(record.turns()[0].text)
        items.append(GenItem(str(i), files[0] if kind == "video" else None, question,
                             images=files if kind == "image" else ()))  # fmt: skip
    answers: dict[str, str | None] = {}
    Generator(loaded, video_settings, settings).run(items, lambda out: answers.__setitem__(out.key, out.text),
                                                    desc="answers")  # fmt: skip
    return raw, answers


def format_summary(summary: dict) -> str:
    chance = ", ".join(f"{k} {v:.3f}" for k, v in summary["chance"].items())
    return (
        f"accuracy {summary['accuracy']:.3f} ({summary['correct']}/{summary['records']}; parse failures "
        f"{summary['parse_failures']}, errors {summary['errors']}); chance: {chance}"
    )


def main(argv: list[str] | None = None) -> dict:
    from swim.eval.generate import (
        add_generation_args,
        add_model_args,
        add_video_args,
        generation_settings_from_args,
        load_model,
        video_settings_from_args,
    )

    parser = argparse.ArgumentParser(prog="swim eval answers", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="task records (swim data synth --task ...)")
    parser.add_argument("--data-root", help="default: the data file's folder")
    parser.add_argument("--out", help="write answers.json here")
    parser.add_argument("--scorer", choices=sorted(SCORERS), help="default: each record's `scorer`")
    parser.add_argument("--limit", type=int, help="only the first N records")
    add_model_args(parser)
    add_generation_args(parser, max_new_tokens=16, batch_size=16)
    add_video_args(parser)
    args = parser.parse_args(argv)
    loaded = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation,
                        device=args.device)  # fmt: skip
    raw, answers = generate_answers(loaded, args.data, video_settings_from_args(args),
                                    generation_settings_from_args(args), args.limit, args.data_root)  # fmt: skip
    summary = score_answers(raw, answers, args.scorer)
    summary.update(model=str(args.model), data=str(args.data))
    line = format_summary(summary)
    logger.info("%s: %s", args.data, line)
    print(line)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "answers.json").write_text(json.dumps(summary, indent=1))
    return summary
