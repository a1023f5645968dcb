"""``swim data synonyms IN --out OUT``: the ``-synonym`` benchmark variant, with every tagged head noun replaced.

    swim data synonyms refined-VideoRefer-Bench-Q.json --out refined-VideoRefer-Bench-Q-synonym.json \\
        --source table --table synonyms.yaml
    swim data synonyms refined-VideoRefer-Bench-Q.json --out out/refined-VideoRefer-Bench-Q-synonym.json \\
        --source llm --llm https://api.openai.com/v1 --model gpt-4o-2024-11-20

Why: SWIM supervises attention from the ``<ins>``-tagged head noun of each object. Its benchmarks have
``-synonym`` variants (SWIM's Bench-Q evaluation reads ``refined-VideoRefer-Bench-Q-synonym.json``) that test
that grounding does not hang on one particular word. SWIM's own procedure for them is **not published**. This
command implements our reading of it, and only that: every tagged head noun is replaced by a synonym.

The policy, per record:

- Objects are the distinct tagged phrases, the k-th (case-insensitively, in order of first appearance over the
  question, then the answer) being object k, as training and evaluation read them (`swim.data.tags`).
- For each object k, in order, a synonym ``s_k`` is chosen among the source's candidates: the first that passes
  every check (`REASONS`): not the same word or its plural (``same_word``), not an article, determiner or pronoun
  (``determiner``), not a vague word or an adjective (``generic``), one word unless ``--allow-multiword``
  (``multiword``), no ``<`` / ``>`` (``placeholder_or_tag``), not another object's noun or synonym, which would
  merge two objects (``collides``), and, with the candidate in place, the record still aligns with the training
  tokenizer: no supervision dropped, no token crossing the edge of the synonym's tags, the same tokens as the
  word alone (``not_single_token_safe``, as `swim.data.nl_refer.checks.alignment_problems`).
- Every tagged occurrence ``<ins>n_k</ins>`` (any case) becomes ``<ins>s_k</ins>`` in every text field
  (Bench-Q ``Question``, ``options`` and ``Answer``, ``conversations`` values, Bench-D ``caption``); the
  capitalisation of each occurrence is kept ("Cub" -> "Whelp", "CUB" -> "WHELP") and an article "a"/"an" right
  before the tag is fixed to the synonym's first letter ("a <ins>dog</ins>" -> "an <ins>animal</ins>"). Untagged
  text is never touched, so Bench-Q options and answers (untagged) and Bench-D captions stay byte-identical, as
  do annotations, ids and every other field. The record gains ``"synonyms": [{"object", "original", "synonym"}]``
  (``synonym`` null and ``kept`` the reason codes for an object that kept its noun).
- An object without a passing candidate keeps its noun (the benchmark keeps its size); it is counted, per reason,
  in the stats, and ``--strict`` makes that exit 1. A record that does not align as it is (tag/object count
  mismatch: ``input_unaligned``) is copied unchanged.

Sources (``--source``):

- ``table`` (``--table FILE``, JSON or YAML, ``noun: [candidate, ...]`` tried in order): looked up
  case-insensitively; a noun ending in "s" that is not in the table is looked up by its singular form, and the
  candidates are then put in the plural;
- ``llm``: one request per record to an OpenAI-compatible chat endpoint (``--llm URL --model NAME``, key from
  ``OPENAI_API_KEY``) with ``prompts/synonyms_v1.md`` and the record's question and tagged nouns; the reply is
  ``{"synonyms": [{"object": 0, "candidates": [...]}, ...]}``. If some object gets no usable candidate, one retry
  in the same conversation gives the rejected candidates and their reasons. Every reply is appended to
  ``OUT_DIR/synonyms_responses.jsonl`` keyed by a sha256 of the request body, and every decision is made from
  that log, so a rerun sends only what is not answered yet.

Outputs: ``OUT`` (a JSON array, one record per line, written atomically) and ``<OUT stem>.stats.json``. Exit
status: 0; 1 with ``--strict`` when some object kept its noun; 2 for an unreadable input or an endpoint that
refuses the client; 3 when some requests failed after all retries (run the same command again).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from swim.data.nl_refer.checks import COMMON_ADJECTIVES, DETERMINERS, GENERIC_NOUNS, PRONOUNS, parse_reply
from swim.data.nl_refer.prompt import RECORD_MARKER, PromptTemplate, request_body
from swim.data.records import RecordError, iter_json_objects, record_from_json
from swim.data.tags import TagError, align_text, check_turn_tags, normalize_phrase

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "synonyms_v1"
LOG_NAME = "synonyms_responses.jsonl"
MEDIA_TOKENS = 4  # video tokens in the alignment check (their number does not matter for the text)
EXIT_STRICT, EXIT_INPUT, EXIT_INCOMPLETE = 1, 2, 3

# Why a candidate is rejected (checked in this order; the first failing check is its reason).
REASONS: dict[str, str] = {
    "empty": "an empty candidate",
    "placeholder_or_tag": "contains '<' or '>' (a tag or placeholder)",
    "same_word": "the object's own noun (up to case, or its singular/plural)",
    "multiword": "more than one word (allowed with --allow-multiword)",
    "determiner": "an article, determiner or pronoun",
    "generic": "a vague word (object, thing, item, ...) or an adjective",
    "collides": "another object's noun or synonym in this record (the two objects would merge)",
    "not_single_token_safe": "with it in place the record does not align to its own tokens (dropped supervision, "
    "a token crossing the tag edge, or other tokens than the word alone)",
}
# Why an object kept its noun, besides the reasons of its rejected candidates.
KEPT_REASONS: dict[str, str] = {
    "no_candidates": "the source has no candidate for the noun",
    "invalid_reply": "the LLM reply was not the JSON asked for (refusal, truncated, invalid JSON or schema)",
    "request_failed": "the LLM request failed after every retry (run again)",
    "not_sent": "no LLM reply logged (interrupted run)",
    "input_unaligned": "the input record does not align as it is (tag/object count mismatch, bad tags)",
}

REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "synonyms": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "object": {"type": "integer"},
                    "candidates": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["object", "candidates"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["synonyms"],
    "additionalProperties": False,
}

_TAGGED_RE = re.compile(r"(?:(?<![\w'’-])(?P<art>(?i:an?))(?P<ws>[ \t]+))?<ins>(?P<inner>.*?)</ins>", re.S)


# ----------------------------------------------------------------------------------------------------------
# Words


def same_word(a: str, b: str) -> bool:
    """Equal after case-folding, or the same word up to a plural ``s`` / ``es`` / ``y``->``ies``."""
    a, b = normalize_phrase(a), normalize_phrase(b)
    if a == b:
        return True
    for x, y in ((a, b), (b, a)):
        if y in (x + "s", x + "es") or (x.endswith("y") and y == x[:-1] + "ies"):
            return True
    return False


def singular_forms(noun: str) -> list[str]:
    """Plausible singulars of a noun ending in "s" (dogs -> dog, boxes -> box, puppies -> puppy)."""
    forms = []
    if noun.endswith("ies"):
        forms.append(noun[:-3] + "y")
    if noun.endswith("s") and not noun.endswith("ss"):
        forms.append(noun[:-1])
    if noun.endswith("es"):
        forms.append(noun[:-2])
    return [f for f in dict.fromkeys(forms) if f]


def pluralize(phrase: str) -> str:
    """English plural of the last word (simple rules: box -> boxes, puppy -> puppies, dog -> dogs)."""
    head, _, last = phrase.rpartition(" ")
    if re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def match_case(original: str, synonym: str) -> str:
    """``synonym`` in the capitalisation pattern of ``original`` (all caps, capitalised, lower case)."""
    letters = [c for c in original if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return synonym.upper()
    if letters and letters[0].isupper():
        return synonym[:1].upper() + synonym[1:]
    if synonym[:1].isupper() and synonym[1:] == synonym[1:].lower():  # "Whelp" for "cub"; "TV" stays
        return synonym.lower()
    return synonym


def article_for(article: str, word: str) -> str:
    """ "a"/"an" before ``word`` (vowel-letter rule), in the case of ``article``."""
    want = "an" if word[:1].lower() in "aeiou" else "a"
    if len(article) > 1 and article.isupper() or (article == "A" and word.isupper() and len(word) > 1):
        return want.upper()
    return want.capitalize() if article[:1].isupper() else want


def replace_in_text(text: str, mapping: dict[str, str]) -> str:
    """Replace every tagged phrase whose normalised form is in ``mapping`` (keeping its case and the spaces inside
    the tag), fixing an article right before the tag."""

    def sub(m: re.Match) -> str:
        inner = m["inner"]
        synonym = mapping.get(normalize_phrase(inner))
        if synonym is None:
            return m.group(0)
        core = inner.strip()
        lead, trail = inner[: len(inner) - len(inner.lstrip())], inner[len(inner.rstrip()) :]
        word = match_case(core, synonym)
        prefix = article_for(m["art"], word) + m["ws"] if m["art"] is not None else ""
        return f"{prefix}<ins>{lead}{word}{trail}</ins>"

    return _TAGGED_RE.sub(sub, text)


def text_slots(obj: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every text field of a record JSON that may hold tags."""
    for key in ("Question", "Answer", "caption"):
        if isinstance(obj.get(key), str):
            yield obj, key
    if isinstance(obj.get("options"), list):
        for i, option in enumerate(obj["options"]):
            if isinstance(option, str):
                yield obj["options"], i
    if isinstance(obj.get("conversations"), list):
        for turn in obj["conversations"]:
            if isinstance(turn, dict):
                for key in ("value", "content"):
                    if isinstance(turn.get(key), str):
                        yield turn, key


def apply_synonyms(obj: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """A copy of the record JSON with its tagged phrases replaced (``mapping``: normalised phrase -> synonym)."""
    out = copy.deepcopy(obj)
    if mapping:
        for container, key in text_slots(out):
            if "<ins>" in container[key]:
                container[key] = replace_in_text(container[key], mapping)
    return out


# ----------------------------------------------------------------------------------------------------------
# Checks


def candidate_problem(candidate: str, *, allow_multiword: bool) -> str | None:
    """The reason code of the first word-level check ``candidate`` fails, or None."""
    words = normalize_phrase(candidate).split()
    if not words:
        return "empty"
    if "<" in candidate or ">" in candidate:
        return "placeholder_or_tag"
    if len(words) > 1 and not allow_multiword:
        return "multiword"
    if any(w in DETERMINERS or w in PRONOUNS for w in words):
        return "determiner"
    if any(w in GENERIC_NOUNS for w in words) or words[-1] in COMMON_ADJECTIVES:
        return "generic"
    return None


def span_alignment(tokenizer, obj: dict[str, Any], source: str) -> tuple[str | None, set[str]]:
    """Align the record JSON as training does: (why supervision is dropped or the record is unreadable, or None;
    the normalised phrases that have a span crossing a token edge or tokenized otherwise than alone)."""
    try:
        record = record_from_json(obj, source=source, index=0)
        sample = align_text(
            tokenizer, record.turns(), media=[("video", MEDIA_TOKENS)], n_objects=len(record.annotation)
        )
    except (RecordError, TagError) as e:
        return str(e), set()
    if sample.skip_reason:
        return sample.skip_reason, set()
    enc = tokenizer(sample.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    text, bad = sample.text, set()
    for start, end, phrase in sample.spans:
        s, e = start + len(phrase) - len(phrase.lstrip()), end - (len(phrase) - len(phrase.rstrip()))
        inside = [i for i, (a, b) in enumerate(offsets) if a < e and b > s and b > a]
        straddles = any(text[a:s].strip() or text[e:b].strip() for a, b in (offsets[i] for i in inside))
        inside = [i for i in inside if text[slice(*offsets[i])].strip()]
        lead = " " if s > 0 and text[s - 1] == " " else ""
        alone = tokenizer(lead + text[s:e], add_special_tokens=False)["input_ids"]
        if straddles or [ids[i] for i in inside] != alone:
            bad.add(normalize_phrase(phrase))
    return None, bad


# ----------------------------------------------------------------------------------------------------------
# One record


@dataclass(frozen=True)
class TaggedObject:
    index: int
    key: str  # the normalised tagged phrase
    original: str  # its first tagged occurrence, stripped


@dataclass
class Item:
    """One input record: its position, the JSON as read, and its objects (None: malformed tags)."""

    position: int
    obj: dict[str, Any]
    objects: list[TaggedObject] | None
    source: str

    @property
    def question(self) -> str:
        """The question as the LLM sees it (Bench-Q: without its options)."""
        if isinstance(self.obj.get("Question"), str):
            return self.obj["Question"].strip()
        return record_from_json(self.obj, source=self.source, index=self.position).turns()[0].text


def read_items(path: Path) -> list[Item]:
    """Every record of ``path``, shape-checked (a bad record raises `RecordError`)."""
    items = []
    for i, obj in iter_json_objects(path):
        if isinstance(obj, RecordError):
            raise obj
        record = record_from_json(obj, source=path, index=i)
        try:
            phrases = check_turn_tags(record.turns())
        except TagError:
            items.append(Item(i, obj, None, str(path)))
            continue
        first: dict[str, str] = {}
        for p in phrases:
            first.setdefault(normalize_phrase(p), " ".join(p.split()))
        objects = [TaggedObject(k, key, text) for k, (key, text) in enumerate(first.items())]
        items.append(Item(i, obj, objects, str(path)))
    return items


@dataclass
class Job:
    """The choice of synonyms for one record, object by object."""

    item: Item
    tokenizer: Any
    allow_multiword: bool = False
    chosen: dict[int, str] = field(default_factory=dict)
    # object -> (candidate, reason code) in the order tried; candidate None for what is no candidate's fault
    # (no_candidates, invalid_reply, input_unaligned, request_failed, not_sent)
    rejected: dict[int, list[tuple[str | None, str]]] = field(default_factory=dict)
    unaligned: str | None = None

    def __post_init__(self) -> None:
        objects = self.item.objects
        if objects is None:
            self.unaligned = "malformed <ins> tags"
        elif objects:
            self.unaligned = span_alignment(self.tokenizer, self.item.obj, self.item.source)[0]
        for o in self.objects:
            self.rejected[o.index] = [(None, "input_unaligned")] if self.unaligned else []

    @property
    def objects(self) -> list[TaggedObject]:
        return self.item.objects or []

    @property
    def open(self) -> list[TaggedObject]:
        """Objects still without a synonym (none when the record cannot be aligned)."""
        return [] if self.unaligned else [o for o in self.objects if o.index not in self.chosen]

    def mapping(self, extra: dict[int, str] | None = None) -> dict[str, str]:
        chosen = {**self.chosen, **(extra or {})}
        return {o.key: chosen[o.index] for o in self.objects if o.index in chosen}

    def check(self, k: int, candidate: str) -> str | None:
        """The reason code ``candidate`` fails for object ``k``, or None."""
        code = candidate_problem(candidate, allow_multiword=self.allow_multiword)
        if code:
            return code
        if same_word(candidate, self.objects[k].original):
            return "same_word"
        for o in self.objects:
            if o.index != k and (
                same_word(candidate, o.original)
                or (o.index in self.chosen and same_word(candidate, self.chosen[o.index]))
            ):
                return "collides"
        trial = apply_synonyms(self.item.obj, self.mapping({k: candidate}))
        reason, bad = span_alignment(self.tokenizer, trial, self.item.source)
        if reason or normalize_phrase(candidate) in bad:
            return "not_single_token_safe"
        return None

    def offer(self, k: int, candidates: list[str]) -> bool:
        """Take the first passing candidate for object ``k``; True if one passed."""
        if not candidates:
            self.rejected[k].append((None, "no_candidates"))
        for raw in candidates:
            candidate = " ".join(raw.split()) if isinstance(raw, str) else ""
            code = self.check(k, candidate)
            if code is None:
                self.chosen[k] = candidate
                return True
            self.rejected[k].append((candidate, code))
        return False

    def kept_reasons(self, k: int) -> list[str]:
        return list(dict.fromkeys(code for _, code in self.rejected[k]))

    def output(self) -> dict[str, Any]:
        """The output record JSON (unchanged, without ``synonyms``, for a record without tagged objects)."""
        if not self.objects:
            return copy.deepcopy(self.item.obj)
        out = apply_synonyms(self.item.obj, self.mapping())
        entries = []
        for o in self.objects:
            entry: dict[str, Any] = {"object": o.index, "original": o.original, "synonym": None}
            if o.index in self.chosen:  # as it reads at the object's first occurrence
                entry["synonym"] = match_case(o.original, self.chosen[o.index])
            else:
                entry["kept"] = self.kept_reasons(o.index)
            entries.append(entry)
        out["synonyms"] = entries
        return out

    def feedback(self, objects: list[TaggedObject]) -> list[str]:
        """One line per object, for the LLM retry."""
        lines = []
        for o in objects:
            tried = "; ".join(
                f"{c!r}: {code} ({REASONS[code]})" if c is not None else KEPT_REASONS[code]
                for c, code in self.rejected[o.index]
            )
            lines.append(f"- object {o.index} ({o.original!r}): {tried or 'no candidate given'}")
        return lines


# ----------------------------------------------------------------------------------------------------------
# Sources


def load_table(path: Path) -> dict[str, list[str]]:
    """``noun: [candidates]`` (a single string is one candidate) from JSON or YAML, keys normalised."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping noun -> list of candidates, got {type(data).__name__}")
    table: dict[str, list[str]] = {}
    for noun, candidates in data.items():
        if isinstance(candidates, str):
            candidates = [candidates]
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise ValueError(f"{path}: {noun!r}: expected a list of strings")
        table.setdefault(normalize_phrase(str(noun)), []).extend(candidates)
    return table


def table_candidates(table: dict[str, list[str]], noun: str) -> list[str]:
    """The candidates of ``noun``; a plural not in the table takes its singular's candidates, pluralised."""
    key = normalize_phrase(noun)
    if key in table:
        return list(table[key])
    if key.endswith("s"):
        for singular in singular_forms(key):
            if singular in table:
                return [pluralize(c.strip()) for c in table[singular]]
    return []


@dataclass(frozen=True)
class LLMSettings:
    template: PromptTemplate
    model: str
    temperature: float = 0.0
    max_tokens: int = 256
    response_format: str = "json_schema"  # json_schema | json_object | none
    seed: int | None = None


def payload(item: Item, allow_multiword: bool) -> dict[str, Any]:
    return {
        "question": item.question,
        "objects": [{"object": o.index, "noun": o.original} for o in item.objects or []],
        "max_words": 3 if allow_multiword else 1,
    }


def body_id(body: dict[str, Any]) -> str:
    """sha256 of the canonical request body: the key of the response log."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "syn-" + hashlib.sha256(canonical.encode()).hexdigest()


def reply_candidates(entry: dict[str, Any]) -> tuple[dict[int, list[str]] | None, str]:
    """(object -> candidates, "") from a logged reply, or (None, why the reply is unusable)."""
    if entry.get("refusal"):
        return None, f"refusal: {str(entry['refusal'])[:200]}"
    if entry.get("finish_reason") in ("length", "content_filter"):
        return None, f"finish_reason {entry['finish_reason']!r}"
    content = entry.get("content")
    try:
        reply = parse_reply(content) if isinstance(content, str) else None
    except ValueError as e:
        return None, f"invalid JSON: {e}"
    items = reply.get("synonyms") if isinstance(reply, dict) else None
    if not isinstance(items, list):
        return None, 'expected {"synonyms": [{"object": 0, "candidates": [...]}, ...]}'
    out: dict[int, list[str]] = {}
    for it in items:
        if (
            isinstance(it, dict)
            and isinstance(it.get("object"), int)
            and isinstance(it.get("candidates"), list)
        ):
            out.setdefault(it["object"], []).extend(c for c in it["candidates"] if isinstance(c, str))
    return out, ""


@dataclass
class Pending:
    """The request a record needs next; ``job`` holds what the earlier replies decided."""

    request_id: str
    body: dict[str, Any]
    attempt: int
    job: Job


@dataclass
class LLMContext:
    settings: LLMSettings
    log: Any  # swim.data.nl_refer.build.ResponseLog
    max_attempts: int = 2


def decide(item: Item, tokenizer, *, allow_multiword: bool, table=None, llm: LLMContext | None = None):
    """The `Job` of one record (its choices made), or the `Pending` request it needs first (LLM source)."""
    job = Job(item, tokenizer, allow_multiword)
    if not job.open:
        return job
    if llm is None:
        for o in job.open:
            job.offer(o.index, table_candidates(table, o.original))
        return job
    template = llm.settings.template
    messages = [
        {"role": "system", "content": template.system},
        {
            "role": "user",
            "content": f"{template.user}\n\n{RECORD_MARKER}\n"
            + json.dumps(payload(item, allow_multiword), ensure_ascii=False, indent=1),
        },
    ]
    for attempt in range(llm.max_attempts):
        body = request_body(llm.settings, messages, schema=REPLY_SCHEMA, schema_name="synonyms")
        rid = body_id(body)
        entry = llm.log.get(rid)
        if entry is None:
            return Pending(rid, body, attempt, job)
        asked = job.open
        candidates, problem = reply_candidates(entry)
        for o in asked:
            if candidates is None:
                job.rejected[o.index].append((None, "invalid_reply"))
            else:
                job.offer(o.index, candidates.get(o.index, []))
        failed = job.open
        if not failed:
            break
        reasons = (
            [f"- the reply could not be used: {problem}"] if candidates is None else []
        ) + job.feedback(failed)
        messages = [
            *messages,
            {"role": "assistant", "content": entry.get("content") or entry.get("refusal") or "(no content)"},
            {"role": "user", "content": template.retry.replace("{reasons}", "\n".join(reasons))},
        ]
    return job


# ----------------------------------------------------------------------------------------------------------
# Sending


async def send_all(
    items: list[Item], tokenizer, args, llm: LLMContext, backend, state: dict[str, Any]
) -> None:
    """Workers take records one at a time and send what each needs until it is decided."""
    from swim.data.nl_refer.llm import RequestFailed

    queue = iter(items)

    async def worker() -> None:
        for item in queue:
            while True:
                step = decide(item, tokenizer, allow_multiword=args.allow_multiword, llm=llm)
                if not isinstance(step, Pending):
                    break
                try:
                    reply = await backend.complete(step.body)
                except RequestFailed as e:
                    state["failed"][item.position] = str(e)
                    logger.warning("record %d: request failed after retries: %s", item.position, e)
                    break
                llm.log.append({"request_id": step.request_id, "position": item.position, "attempt": step.attempt,
                                "model": llm.settings.model, "prompt_version": llm.settings.template.version,
                                **reply})  # fmt: skip
                state["sent"] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, backend.concurrency))))
    finally:
        await backend.aclose()


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swim data synonyms", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("input", type=Path, help="a refined NL-Refer-format record file (.json array or .jsonl)")
    p.add_argument("--out", type=Path, required=True, help="the output .json (stats next to it)")
    p.add_argument("--source", choices=("table", "llm"), default="table")
    p.add_argument("--table", type=Path, help="--source table: JSON/YAML mapping noun -> list of candidates")
    p.add_argument("--allow-multiword", action="store_true", help="accept synonyms of up to several words")
    p.add_argument("--strict", action="store_true", help="exit 1 if some object kept its noun")
    p.add_argument(
        "--tokenizer", default="Qwen/Qwen2.5-VL-7B-Instruct", help="tokenizer of the alignment check"
    )
    g = p.add_argument_group("--source llm")
    g.add_argument("--llm", default=os.environ.get("OPENAI_BASE_URL"), help="OpenAI-compatible base URL")
    g.add_argument("--model", help="model name")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="a packaged prompt name or a prompt file path")
    g.add_argument("--concurrency", type=int, default=8)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--response-format", choices=("json_schema", "json_object", "none"), default="json_schema")
    g.add_argument("--timeout-s", type=float, default=120.0)
    g.add_argument(
        "--max-retries", type=int, default=6, help="transport retries per request (429, 5xx, timeouts)"
    )
    g.add_argument("--backoff-s", type=float, default=1.0)
    g.add_argument("--no-fsync", action="store_true", help="do not fsync each logged reply")
    args = p.parse_args(argv)
    if not args.input.is_file():
        p.error(f"input file not found: {args.input}")
    if args.source == "table" and args.table is None:
        p.error("--source table needs --table FILE")
    if args.source == "table" and not args.table.is_file():
        p.error(f"table not found: {args.table}")
    if args.source == "llm" and not (args.llm and args.model):
        p.error("--source llm needs --llm URL (or OPENAI_BASE_URL) and --model NAME")
    return args


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """The family's tokenizer without torch (`swim.data.text_tokenizer`: same ids, offsets and chat template)."""
    from swim.data.text_tokenizer import TextTokenizer

    return TextTokenizer.from_pretrained(name)


def stats_path(out: Path) -> Path:
    return out.with_name(out.stem + ".stats.json")


def run(args) -> int:
    from swim.data.nl_refer.build import JsonArrayWriter, ResponseLog

    items = read_items(args.input)
    tokenizer = load_tokenizer(str(args.tokenizer))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table, llm, log = None, None, None
    state: dict[str, Any] = {"sent": 0, "failed": {}}
    if args.source == "table":
        table = load_table(args.table)
    else:
        from swim.data.nl_refer import llm as llm_mod

        template = PromptTemplate.load(args.prompt)
        settings = LLMSettings(template, args.model, args.temperature, args.max_tokens, args.response_format,
                               args.seed)  # fmt: skip
        log = ResponseLog(args.out.parent / LOG_NAME, fsync=not args.no_fsync)
        llm = LLMContext(settings, log)
        retry = llm_mod.RetryPolicy(
            max_retries=args.max_retries, backoff_s=args.backoff_s, timeout_s=args.timeout_s
        )
        backend = llm_mod.OpenAIBackend(
            args.llm, os.environ.get("OPENAI_API_KEY") or "EMPTY", concurrency=args.concurrency, retry=retry
        )
        logger.info("prompt %s (%s), model %s, %d replies in %s", template.name, template.version, args.model,
                    len(log), log.path)  # fmt: skip
        asyncio.run(send_all(items, tokenizer, args, llm, backend, state))

    counts: Counter[str] = Counter()
    kept_by: Counter[str] = Counter()
    rejected_by: Counter[str] = Counter()
    writer = JsonArrayWriter(args.out)
    try:
        for item in items:
            step = decide(item, tokenizer, allow_multiword=args.allow_multiword, table=table, llm=llm)
            if isinstance(step, Pending):  # a reply is missing: the objects it was for keep their noun
                job = step.job
                code = "request_failed" if item.position in state["failed"] else "not_sent"
                for o in job.open:
                    job.rejected[o.index].append((None, code))
            else:
                job = step
            counts["records"] += 1
            counts["objects"] += len(job.objects)
            counts["replaced"] += len(job.chosen)
            counts["records_changed"] += bool(job.chosen)
            counts["records_with_kept"] += len(job.chosen) < len(job.objects)
            counts["records_unaligned"] += bool(job.unaligned)
            for o in job.objects:
                rejected_by.update(code for c, code in job.rejected[o.index] if c is not None)
                if o.index not in job.chosen:
                    kept_by.update(job.kept_reasons(o.index))
            out = job.output()
            record_from_json(out, source=args.out, index=item.position)  # never write what readers refuse
            writer.write(out)
    except BaseException:
        writer.file.close()
        writer.tmp.unlink(missing_ok=True)
        raise
    writer.close()
    kept = counts["objects"] - counts["replaced"]
    stats: dict[str, Any] = {
        "input": str(args.input),
        "output": str(args.out),
        "source": args.source,
        "records": counts["records"],
        "records_changed": counts["records_changed"],
        "records_with_kept": counts["records_with_kept"],
        "records_unaligned": counts["records_unaligned"],
        "objects": counts["objects"],
        "replaced": counts["replaced"],
        "kept": kept,
        "kept_by_reason": dict(sorted(kept_by.items())),
        "rejected_candidates": dict(sorted(rejected_by.items())),
        "allow_multiword": args.allow_multiword,
        "tokenizer": str(args.tokenizer),
    }
    if table is not None:
        stats["table"] = str(args.table)
    if llm is not None:
        stats.update(
            prompt=llm.settings.template.name,
            prompt_version=llm.settings.template.version,
            model=llm.settings.model,
            requests={
                "sent_this_run": state["sent"],
                "in_log": len(log),
                "failed_this_run": len(state["failed"]),
            },
        )
        log.close()
    tmp = stats_path(args.out).with_name(stats_path(args.out).name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=1) + "\n")
    os.replace(tmp, stats_path(args.out))
    logger.info("%d records, %d objects: %d replaced, %d kept %s; %s", stats["records"], stats["objects"],
                stats["replaced"], kept, stats["kept_by_reason"], args.out)  # fmt: skip
    if state["failed"]:
        return EXIT_INCOMPLETE
    if args.strict and kept:
        logger.error("--strict: %d object(s) kept their noun", kept)
        return EXIT_STRICT
    return 0


def main(argv: list[str] | None = None) -> None:
    from swim.data.nl_refer.llm import FatalLLMError

    args = parse_args(argv)
    try:
        code = run(args)
    except (RecordError, ValueError, FatalLLMError) as e:
        logger.error("%s", e)
        code = EXIT_INPUT
    if code:
        sys.exit(code)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
