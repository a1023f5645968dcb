"""VideoRefer-Bench-Q: multiple-choice questions about referred objects, scored by option letter.

    swim eval bench-q --model CKPT --bench refined-VideoRefer-Bench-Q.json --data-root VIDEOS --out OUT
    # over 4 GPUs: one process per shard, then merge (identical results to one process)
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i swim eval bench-q ... --num-shards 4 --shard-index $i & done
    wait
    swim eval bench-q --merge --bench refined-VideoRefer-Bench-Q.json --out OUT

Both bench variants work, detected per question:
- NL-refined (SWIM): ``<ins>…</ins>`` tags are removed, keeping the words.
- original (VideoRefer): the ``<objectN><region>`` visual-prompt placeholders refer to masks a text-only model
  never sees. They become the words ``object N`` (a lone ``<region>`` becomes ``the object``), so the run
  works, but these numbers are not comparable with mask-prompted models.

Prompt (docs/official_release.md §5.1, without the official script's stray literal ``<video>``): the question,
the options one per line, then ``Answer with the option's letter from the given choices directly.``; the video
comes first in the user turn. Answers are parsed by `parse_answer_letter` (``(B)``, ``B)``, ``B.``, ``B``,
``Answer: B``, lowercase, the option's text, ...); an answer with no recognisable option is counted wrong and
listed under ``parse_failures``. Items whose video cannot be decoded or whose generation failed are counted
wrong and listed under ``errors``. Malformed bench records (no options, no ground-truth letter) cannot be
scored: they are left out of the accuracy and listed under ``invalid_records``. Accuracy is the micro-average
over questions, overall and per ``type``, in percent.

Outputs in ``--out``: ``generations*.jsonl`` (raw answers, resumable cache), ``predictions.jsonl`` (one line
per question, bench order) and ``results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swim.data.records import BENCH_Q_SUFFIX, BENCH_Q_TYPES, RecordError, iter_json_objects, record_from_json
from swim.data.tags import TagError, strip_tags
from swim.eval.generate import (
    Generator,
    GenItem,
    add_generation_args,
    add_model_args,
    add_video_args,
    generation_settings_from_args,
    load_model,
    read_generations,
    run_generation_stage,
    video_settings_dict,
    video_settings_from_args,
)
from swim.eval.sharding import Shard

logger = logging.getLogger(__name__)

PROMPT_VERSION = 1  # bump when prompt building changes, so old generation caches are not reused

# ---------------------------------------------------------------------------------------------------------
# Text cleaning (shared with bench-d)

_OBJECT_REGION = re.compile(r"<object\s*(\d+)>\s*<region>")
_OBJECT = re.compile(r"<object\s*(\d+)>")
_REGION = re.compile(r"<region>")
_MEDIA = re.compile(r"<(?:video|image)>\n?")
_INS = re.compile(r"</?ins>")


def clean_text(text: str) -> str:
    """Bench text as a text-only model should see it: ``<ins>`` tags removed (words kept), VideoRefer's
    ``<objectN><region>`` placeholders replaced by ``object N`` (a lone ``<region>`` by ``the object``),
    literal ``<video>``/``<image>`` removed, runs of spaces collapsed."""
    try:
        text = strip_tags(text)
    except TagError as e:  # malformed tags: still drop them, the words are what matters here
        logger.debug("malformed <ins> tags (%s) in %r; removing them anyway", e, text[:80])
        text = _INS.sub("", text)
    text = _OBJECT_REGION.sub(lambda m: f"object {m.group(1)}", text)
    text = _OBJECT.sub(lambda m: f"object {m.group(1)}", text)
    text = _REGION.sub("the object", text)
    text = _MEDIA.sub("", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([?.!,;:])", r"\1", text)
    return "\n".join(line.strip() for line in text.strip().splitlines())


def load_bench(
    path: str | Path, kind: str, data_root: str | Path | None = None
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Validated bench records and the problems of the malformed ones (``RecordError.as_dict()``).

    Masks are not used by a text-only eval, so ``annotation`` is dropped before validation: a bad mask must
    not remove a question from the bench.
    """
    root = None if data_root is None else str(data_root)
    records, problems = [], []
    for i, obj in iter_json_objects(path):
        try:
            if isinstance(obj, RecordError):
                raise obj
            if isinstance(obj, dict):
                obj = {k: v for k, v in obj.items() if k != "annotation"}
            records.append(record_from_json(obj, source=path, index=i, kind=kind, data_root=root))
        except RecordError as e:
            problems.append(e.as_dict())
    for p in problems:
        logger.warning(
            "skipping malformed record %s:%s: %s: %s", p["file"], p["index"], p["field"], p["reason"]
        )
    return records, problems


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Options and answer letters

_PAREN_PREFIX = re.compile(r"^\s*[(\[]\s*([A-Za-z])\s*[)\]]\s*(.*)$", re.S)
_PUNCT_PREFIX = re.compile(r"^\s*([A-Za-z])\s*[.):：]\s*(.*)$", re.S)


def split_options(options: Sequence[str]) -> tuple[list[str], list[str]]:
    """Letters and texts of ``"(A) text"`` / ``"A. text"`` / ``"A) text"`` options.

    Options without a letter prefix (or with repeated letters) get A, B, C, ... by position.
    """
    letters, texts = [], []
    for opt in options:
        m = _PAREN_PREFIX.match(opt) or _PUNCT_PREFIX.match(opt)
        letters.append(m.group(1).upper() if m else "")
        texts.append((m.group(2) if m else opt).strip())
    if "" in letters or len(set(letters)) != len(letters):
        letters = list(string.ascii_uppercase[: len(options)])
    return letters, texts


def format_options(options: Sequence[str]) -> list[str]:
    """Options as shown to the model: kept as written when they carry their letter, else ``(A) text``."""
    letters, texts = split_options(options)
    out = []
    for opt, letter, text in zip(options, letters, texts):
        m = _PAREN_PREFIX.match(opt) or _PUNCT_PREFIX.match(opt)
        out.append(opt.strip() if m and m.group(1).upper() == letter else f"({letter}) {text}")
    return out


def _norm(text: str) -> str:
    """Lowercase, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _match_option_text(answer: str, letters: Sequence[str], texts: Sequence[str]) -> str | None:
    """The option whose text the answer equals, or else the unique longest option text it contains."""
    a = _norm(answer)
    if not a:
        return None
    normed = [_norm(t) for t in texts]
    exact = [letter for letter, t in zip(letters, normed) if t and t == a]
    if len(exact) == 1:
        return exact[0]
    contained = [(len(t), letter) for letter, t in zip(letters, normed) if t and f" {t} " in f" {a} "]
    if not contained:
        return None
    contained.sort(reverse=True)
    if len(contained) == 1 or contained[0][0] > contained[1][0]:
        return contained[0][1]
    return None


_ANSWER_IS = re.compile(
    r"\b(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:：]?\s*[*_\[(]*([A-Za-z])(?![A-Za-z'’])"
)


def _is_article(letter: str, rest: str) -> bool:
    """``A``/``I`` followed by a lowercase word ("A man ...", "I think ...") is a word, not a letter."""
    return letter in ("A", "I") and re.match(r"\s+[a-z]", rest) is not None


def parse_answer_letter(answer: str | None, options: Sequence[str]) -> tuple[str | None, str]:
    """The option letter a model's answer picks, and how it was found (or ``(None, "unparsed"/"empty")``).

    In order: the whole answer is a letter (``B``, ``(B)``, ``b.``, ``**B**``); the first ``(B)``; a leading
    ``B.``/``B)``/``B:``; ``answer/option/choice (is) B``; the option's text; a lone capital letter. ``A`` or
    ``I`` followed by a lowercase word (``A man ...``) is read as a word, not a letter. Only the options'
    letters count; several different bare letters are ambiguous (unparsed).
    """
    letters, texts = split_options(options)
    valid = set(letters)
    s = (answer or "").strip()
    if not s:
        return None, "empty"

    def ok(letter: str) -> str | None:
        return letter.upper() if letter.upper() in valid else None

    m = re.fullmatch(r"[\s*_\[(]*([A-Za-z])[\s*_\]).:]*", s)
    if m and ok(m.group(1)):
        return ok(m.group(1)), "letter"
    for m in re.finditer(r"\(\s*([A-Za-z])\s*\)", s):
        if ok(m.group(1)):
            return ok(m.group(1)), "parenthesized"
    m = re.match(r"^[\s*_]*([A-Za-z])[).:：](?:\s|$)", s)
    if m and ok(m.group(1)):
        return ok(m.group(1)), "leading"
    for m in _ANSWER_IS.finditer(s):
        letter, rest = m.group(1), s[m.end() :]
        if letter.islower() and not re.match(r"[*_\])]*\s*(?:$|[.),;:!])", rest):
            continue  # "answer is a hat": an article, not a letter
        if _is_article(letter, rest):
            continue
        if ok(letter):
            return ok(letter), "answer-is"
    letter = _match_option_text(s, letters, texts)
    if letter:
        return letter, "option-text"
    bare = {
        m.group(1)
        for m in re.finditer(r"(?<![A-Za-z'’])([A-Z])(?![A-Za-z'’])", s)
        if m.group(1) in valid and not _is_article(m.group(1), s[m.end() :])
    }
    if len(bare) == 1:
        return bare.pop(), "bare-letter"
    return None, "unparsed"


def ground_truth_letter(answer: str, options: Sequence[str]) -> str | None:
    """The correct option's letter from the bench's ``Answer`` (``"(A) A helmet"``, ``"A"`` or the text)."""
    letters, texts = split_options(options)
    m = re.match(r"^\s*[(\[]\s*([A-Za-z])\s*[)\]]", answer) or re.fullmatch(
        r"\s*([A-Za-z])\s*[.)]?\s*", answer
    )
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return _match_option_text(answer, letters, texts)


# ---------------------------------------------------------------------------------------------------------
# Items and scoring


@dataclass
class QItem:
    key: str  # str(position in the bench file)
    index: int
    id: Any
    type: str
    video: str  # resolved path
    prompt: str
    options: list[str]
    gt: str


def build_items(records: Sequence[Any]) -> tuple[list[QItem], list[dict[str, Any]]]:
    """Prompted items, and the records that cannot be scored (no ground-truth letter)."""
    items, invalid = [], []
    for r in records:
        gt = ground_truth_letter(r.answer, r.options)
        if gt is None:
            err = r.error("Answer", f"cannot find the correct option's letter in {r.answer!r}").as_dict()
            logger.warning("skipping record %s:%s: %s", err["file"], err["index"], err["reason"])
            invalid.append(err)
            continue
        options = format_options(r.options)
        prompt = "\n".join([clean_text(r.question), *options, BENCH_Q_SUFFIX])
        items.append(
            QItem(
                key=str(r.position),
                index=r.position,
                id=r.id,
                type=r.type or "unknown",
                video=str(r.media[1]),
                prompt=prompt,
                options=options,
                gt=gt,
            )
        )
    return items, invalid


def score(
    items: Sequence[QItem], generations: dict[str, dict[str, Any]], *, allow_incomplete: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-question predictions (bench order) and the summary. Errors and parse failures count as wrong."""
    missing = [it.key for it in items if it.key not in generations]
    if missing and not allow_incomplete:
        raise RuntimeError(
            f"{len(missing)} question(s) have no generated answer (first: {missing[:5]}); rerun the missing "
            "shard(s) (they resume) or pass --allow-incomplete to count them as wrong"
        )
    predictions = []
    for it in items:
        gen = generations.get(it.key)
        error = "missing: no generation" if gen is None else gen.get("error")
        raw = None if gen is None else gen.get("text")
        letter, method = (None, "error") if error else parse_answer_letter(raw, it.options)
        predictions.append(
            {
                "key": it.key,
                "index": it.index,
                "id": it.id,
                "type": it.type,
                "video": it.video,
                "gt": it.gt,
                "pred": letter,
                "parse": method,
                "correct": letter == it.gt,
                "raw": raw,
                "error": error,
            }
        )
    return predictions, summarize(predictions)


def _accuracy(n_correct: int, n: int) -> float | None:
    return None if n == 0 else 100.0 * n_correct / n


def summarize(predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(predictions)
    n_correct = sum(p["correct"] for p in predictions)
    types = [t for t in BENCH_Q_TYPES if any(p["type"] == t for p in predictions)]
    types += sorted({p["type"] for p in predictions} - set(BENCH_Q_TYPES))
    per_type = {}
    for t in types:
        ps = [p for p in predictions if p["type"] == t]
        c = sum(p["correct"] for p in ps)
        per_type[t] = {"n": len(ps), "correct": c, "accuracy": _accuracy(c, len(ps))}
    errors = [{"key": p["key"], "id": p["id"], "error": p["error"]} for p in predictions if p["error"]]
    unparsed = [
        {"key": p["key"], "id": p["id"], "raw": p["raw"]}
        for p in predictions
        if not p["error"] and p["pred"] is None
    ]
    methods: dict[str, int] = {}
    for p in predictions:
        methods[p["parse"]] = methods.get(p["parse"], 0) + 1
    return {
        "n_questions": n,
        "n_correct": n_correct,
        "accuracy": _accuracy(n_correct, n),
        "per_type": per_type,
        "n_parse_failures": len(unparsed),
        "parse_failures": unparsed,
        "n_errors": len(errors),
        "errors": errors,
        "parse_methods": dict(sorted(methods.items())),
    }


def write_outputs(
    out_dir: Path, predictions: Sequence[dict], summary: dict, invalid: Sequence[dict], config: dict
) -> dict[str, Any]:
    """Write ``predictions.jsonl`` and ``results.json``; returns the results. Same bytes for the same input,
    however many shards produced the generations."""
    results = {
        "benchmark": "VideoRefer-Bench-Q",
        **summary,
        "n_invalid_records": len(invalid),
        "invalid_records": list(invalid),
        "config": config,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


def log_results(results: dict[str, Any], out_dir: Path) -> None:
    acc = results["accuracy"]
    logger.info(
        "Bench-Q accuracy %s over %d questions (%d correct; %d unparsed and %d failed, counted wrong; "
        "%d invalid records left out)",
        "n/a" if acc is None else f"{acc:.2f}%", results["n_questions"], results["n_correct"],
        results["n_parse_failures"], results["n_errors"], results["n_invalid_records"],
    )  # fmt: skip
    for t, r in results["per_type"].items():
        logger.info("  %-24s %6.2f%%  (%d/%d)", t, r["accuracy"] or 0.0, r["correct"], r["n"])
    logger.info("wrote %s and %s", out_dir / "results.json", out_dir / "predictions.jsonl")


# ---------------------------------------------------------------------------------------------------------
# Command line


def add_bench_io_args(parser: argparse.ArgumentParser, bench: str) -> None:
    """--bench / --data-root / --out / --limit, shared by the Bench-Q and Bench-D commands."""
    parser.add_argument("--bench", help=f"{bench} JSON, original or NL-refined (with --merge: default the one "
                        "the generations were made for)")  # fmt: skip
    parser.add_argument("--data-root", default=None, help="folder the 'video' paths are relative to "
                        "(default: the bench file's folder)")  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records (smoke tests)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swim eval bench-q", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_io_args(parser, "Bench-Q")
    parser.add_argument("--num-shards", type=int, default=1, help="split the questions over N processes")
    parser.add_argument("--shard-index", type=int, default=0, help="which shard this process runs")
    parser.add_argument("--merge", action="store_true", help="score the shards' generations (no model)")
    parser.add_argument("--overwrite", action="store_true", help="discard this shard's earlier generations")
    parser.add_argument("--allow-incomplete", action="store_true", help="score missing answers as wrong")
    add_model_args(parser, required=False)
    add_generation_args(parser, max_new_tokens=128, batch_size=4)
    add_video_args(parser)
    return parser


def run_config(
    args: argparse.Namespace, model_path: str, prompt_version: int = PROMPT_VERSION
) -> dict[str, Any]:
    """Everything that changes the answers; fingerprinted into the generation files (Bench-Q and -D)."""
    return {
        "model": model_path,
        "dtype": args.dtype,
        "attn_implementation": args.attn_implementation,
        "bench": str(Path(args.bench).resolve()),
        "bench_sha256": file_sha256(args.bench),
        "limit": args.limit,
        "prompt_version": prompt_version,
        "generation": generation_settings_from_args(args).fingerprint_fields(),
        "video": video_settings_dict(video_settings_from_args(args)),
    }


def run(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run (or merge) Bench-Q; returns the results dict when this process wrote them."""
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    shard = Shard(args.shard_index, args.num_shards)
    if args.merge:  # the bench and limit come from the generation files unless given
        generations, config = read_generations(out_dir)
        bench, limit = args.bench or config["bench"], config["limit"]
        check_same_bench(bench, config)
    else:
        if not args.model or not args.bench:
            raise SystemExit("--model and --bench are required (except with --merge)")
        bench, limit = args.bench, args.limit
    if not Path(bench).is_file():
        raise SystemExit(f"--bench {bench}: no such file")
    data_root = args.data_root if args.data_root is not None else str(Path(bench).resolve().parent)
    items, invalid = load_items(bench, data_root, limit)

    if not args.merge:
        config = run_config(args, str(Path(args.model).expanduser().resolve()))
        video_settings, gen_settings = video_settings_from_args(args), generation_settings_from_args(args)

        def make_generator() -> Generator:
            loaded = load_model(
                args.model, dtype=args.dtype, attn_implementation=args.attn_implementation, device=args.device
            )
            return Generator(loaded, video_settings, gen_settings)

        gen_items = [GenItem(it.key, Path(it.video), it.prompt) for it in items]
        run_generation_stage(
            gen_items, out_dir=out_dir, shard=shard, config=config, make_generator=make_generator,
            overwrite=args.overwrite, desc=f"bench-q{shard.suffix}",
        )  # fmt: skip
        if shard.count > 1:
            logger.info(
                "shard %d/%d done; run with --merge when all shards are", shard.index + 1, shard.count
            )
            return None
        generations, config = read_generations(out_dir, num_shards=1)

    predictions, summary = score(items, generations, allow_incomplete=args.allow_incomplete)
    results = write_outputs(out_dir, predictions, summary, invalid, config)
    log_results(results, out_dir)
    return results


def load_items(bench: str | Path, data_root: str | Path, limit: int | None) -> tuple[list[QItem], list[dict]]:
    records, problems = load_bench(bench, "bench_q", data_root)
    items, invalid = build_items(records)
    invalid = problems + invalid
    if limit is not None:
        items = items[:limit]
    logger.info("%s: %d questions (%d invalid records)", bench, len(items), len(invalid))
    return items, invalid


def check_same_bench(bench: str | Path, config: dict[str, Any]) -> None:
    """Refuse to score generations made for another version of the bench file."""
    if file_sha256(bench) != config.get("bench_sha256"):
        raise SystemExit(
            f"{bench} differs from the bench file the generations were made for ({config.get('bench')}, "
            f"sha256 {config.get('bench_sha256')})"
        )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (returns None so that console scripts exit 0); see `run`."""
    run(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
