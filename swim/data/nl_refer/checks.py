"""Validation of one rewriting reply: every check returns reason codes, and nothing invalid reaches an output file.

The checks, in order (each a reason code; `REASONS` says what it means):

- transport-level: ``refusal`` (a refusal field, or a non-JSON reply that reads as one), ``truncated``
  (``finish_reason`` ``length``), ``content_filter``;
- shape: ``invalid_json``, ``schema`` (the fixed schema of `swim.data.nl_refer.prompt.REPLY_SCHEMA`),
  ``object_count`` / ``object_order`` (one entry per annotation index, in order);
- language: ``placeholder_leak`` (``<region>``, ``<objectN>``, ``[OBJk]``, ``<video>`` left over),
  ``mask_language`` (masks, contours, outlines, highlights, overlays, boxes: words the source did not use),
  ``expression_too_long``, ``ambiguous_expressions`` (two objects, one expression);
- tags: ``tag_malformed`` (unclosed, nested, empty), ``tag_determiner`` / ``tag_adjective`` (a determiner or a
  modifier tagged instead of the head noun), ``generic_head_noun`` ("object", "thing", ...),
  ``head_noun_not_in_expression``, ``tag_inconsistent`` (a tagged string that is no object's head noun, or two
  objects with one head noun), ``tag_missing`` (an object never tagged in the question), ``object_order``
  (first mentions not in annotation order: the k-th distinct tagged phrase must be object k);
- content: ``facts_changed`` (the answer's words outside its placeholders changed, or the kept answer of a
  Bench-Q / Bench-D record returned changed), ``question_changed`` (the question's words outside its placeholders
  and its introduction line changed), ``answer_missing`` (placeholders in the answer, but no answer returned),
  ``text_too_long`` (more words than the source's plus ``max_expression_words`` per placeholder, plus a little);
- (in `swim.data.nl_refer.build`) ``duplicate``: a training record whose video and rewritten question another
  accepted record already has;
- the contract with training: the output record is read back with `swim.data.records.record_from_json` and
  aligned with the family's tokenizer by `swim.data.tags.align_text` (`build_text` without tensors), exactly as the collator does; each tagged
  span must give its own tokens with no token crossing the tag edge, and the same token ids as the span tokenized
  on its own (so that SWIM's official loader, which searches for the standalone tokens, finds it too):
  ``token_alignment``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from swim.data.records import RecordError, record_from_json
from swim.data.tags import TagError, align_text, normalize_phrase, parse_tags, strip_tags

REASONS: dict[str, str] = {
    "refusal": "the model refused",
    "truncated": "the reply was cut off (finish_reason 'length')",
    "content_filter": "the reply was filtered (finish_reason 'content_filter')",
    "invalid_json": "the reply is not one JSON object",
    "schema": "the JSON does not follow the reply schema",
    "object_count": "not one entry per object",
    "object_order": "objects not in annotation order (entries, or first mentions in the text)",
    "placeholder_leak": "a <region>/<objectN>/[OBJk]/<video> marker is left in the text",
    "mask_language": "mentions masks, contours, outlines, highlights, overlays or boxes",
    "expression_too_long": "a referring expression is longer than allowed",
    "ambiguous_expressions": "two objects have the same expression",
    "tag_malformed": "malformed <ins> tags",
    "tag_determiner": "a determiner or pronoun is tagged instead of the head noun",
    "tag_adjective": "a modifier (adjective, noun modifier) is tagged instead of the head noun",
    "generic_head_noun": "the head noun is a vague word (object, thing, region, ...)",
    "head_noun_not_in_expression": "the head noun does not occur in the object's expression",
    "tag_inconsistent": "a tagged string is not its object's head noun, or two objects share one",
    "tag_missing": "an object is never tagged in the question",
    "facts_changed": "the answer changed beyond its placeholders",
    "question_changed": "the question changed beyond its placeholders",
    "answer_missing": "the answer has placeholders but no rewritten answer was returned",
    "text_too_long": "the question or answer grew more than its placeholders allow",
    "duplicate": "another accepted record has the same video and rewritten question (a training file keeps the first)",
    "token_alignment": "a tagged span does not align to its own tokens as the training collator sees them",
    "record": "the rewritten record does not read as a training record",
}


def wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = wordset(
    "a an the this that these those some any each every either neither no another other such what which whose "
    "my your his her its our their one two three both all few many several much more most"
)
PRONOUNS = wordset("i you he she it we they him her them me us who whom someone something one")
GENERIC_NOUNS = wordset("object objects thing things region regions item items entity entities target")
COMMON_ADJECTIVES = wordset(
    "red green blue yellow purple white black orange pink brown grey gray golden silver dark light bright "
    "small large big tiny huge little tall short long young old left right front back top bottom upper lower "
    "first second third last middle other same different main"
)
# Words that may follow a head noun inside its noun phrase (prepositions, relative words, conjunctions).
PHRASE_BOUNDARY = wordset(
    "in on at with without near by under over behind beside between from to of for into onto inside outside "
    "above below around along across through toward towards who which that whose wearing holding carrying "
    "and or while as"
)
_PLACEHOLDER_RE = re.compile(r"<region>|<object\s*\d*>|\[OBJ\d*\]|<video>|<image>", re.I)
_INTRO_LINE_RE = re.compile(r"^\s*there (?:is|are)\b[^\n]*<region>[^\n]*(?:\n|$)", re.I)
_RAW_PLACEHOLDER_RE = re.compile(r"<object\d+>\s*\[?\s*<region>\s*\]?|<object\d+>|<region>")
_MASK_WORDS_RE = re.compile(
    r"\b(masks?|masked|masking|contours?|outlined?|outlines|outlining|highlight(?:s|ed|ing)?|overlays?|"
    r"bounding boxes|bounding box|segmentations?|segmented|annotated|marked)\b",
    re.I,
)
_REFUSAL_RE = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i cannot|i won'?t|i am unable|i'm unable|as an ai)",
    re.I,
)
_WORD_RE = re.compile(r"[\w'-]+")


@dataclass(frozen=True)
class CheckConfig:
    max_expression_words: int = 12
    media_tokens: int = 4  # video tokens in the alignment check (their number does not matter for the text)


@dataclass
class Verdict:
    """The outcome of validating one reply: the parsed rewrite when it passes, else the problems."""

    problems: list[tuple[str, str]] = field(default_factory=list)  # (code, detail)
    rewrite: dict[str, Any] | None = None  # the parsed reply
    record: dict[str, Any] | None = None  # the output record, when it passes

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def codes(self) -> list[str]:
        return sorted({c for c, _ in self.problems})

    def feedback(self) -> list[str]:
        """One line per problem, for the retry prompt."""
        return [f"- {code}: {detail}" for code, detail in self.problems]


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.casefold())


def parse_reply(content: str) -> Any:
    """The JSON object of a reply; raises ValueError.

    Tolerated, for servers without a JSON mode: a ```json fence around it, or one object inside prose
    ("Here is the JSON: {...}"): the text from the first ``{`` to the last ``}``, when that alone parses.
    """
    text = content.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    if fence:
        text = fence.group(1)
    try:
        return json.loads(text)
    except ValueError:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(text[start : end + 1])
            except ValueError:
                pass
        raise


def check_schema(reply: Any, n_objects: int) -> list[tuple[str, str]]:
    if not isinstance(reply, dict):
        return [("schema", f"expected a JSON object, got {type(reply).__name__}")]
    problems = []
    if not isinstance(reply.get("question"), str) or not reply["question"].strip():
        problems.append(("schema", "'question' must be a non-empty string"))
    if "answer" not in reply or not (reply["answer"] is None or isinstance(reply["answer"], str)):
        problems.append(("schema", "'answer' must be a string or null"))
    objects = reply.get("objects")
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        return [*problems, ("schema", "'objects' must be a list of objects")]
    for i, o in enumerate(objects):
        if not isinstance(o.get("object"), int) or isinstance(o.get("object"), bool):
            problems.append(("schema", f"objects[{i}].object must be an integer"))
        for key in ("expression", "head_noun"):
            if not isinstance(o.get(key), str) or not o[key].strip():
                problems.append(("schema", f"objects[{i}].{key} must be a non-empty string"))
    if problems:
        return problems
    indices = [o["object"] for o in objects]
    if len(indices) != n_objects or sorted(indices) != list(range(n_objects)):
        return [("object_count", f"objects {indices}, expected {list(range(n_objects))}")]
    if indices != list(range(n_objects)):
        return [("object_order", f"objects listed as {indices}, expected {list(range(n_objects))}")]
    return []


def head_noun_problems(objects: Sequence[dict], max_words: int) -> list[tuple[str, str]]:
    """Per-object checks of expression and head noun (the entries are schema-checked)."""
    problems = []
    for o in objects:
        k, noun, expression = o["object"], o["head_noun"].strip(), o["expression"]
        noun_key = noun.casefold()
        expr_words = words(expression)
        if len(expr_words) > max_words:
            problems.append(("expression_too_long", f"object {k}: {len(expr_words)} words > {max_words}"))
        if noun_key in DETERMINERS or noun_key in PRONOUNS:
            problems.append(("tag_determiner", f"object {k}: head noun {noun!r} is a determiner or pronoun"))
            continue
        if noun_key in GENERIC_NOUNS:
            problems.append(("generic_head_noun", f"object {k}: head noun {noun!r} is too vague"))
        noun_words = words(noun)
        positions = [
            i
            for i in range(len(expr_words))
            if expr_words[i : i + len(noun_words)] == noun_words and noun_words
        ]
        if not positions:
            if not noun.isascii() and noun in expression:  # scripts without spaces between words
                continue
            problems.append(
                ("head_noun_not_in_expression", f"object {k}: {noun!r} not in expression {expression!r}")
            )
            continue
        after = [expr_words[i + len(noun_words)] for i in positions if i + len(noun_words) < len(expr_words)]
        is_modifier = len(after) == len(positions) and all(
            w not in PHRASE_BOUNDARY and not w.endswith("ing") for w in after
        )
        if noun_key in COMMON_ADJECTIVES or is_modifier:
            problems.append(
                (
                    "tag_adjective",
                    f"object {k}: {noun!r} modifies the next word in {expression!r}; tag the head noun",
                )
            )
    keys = [normalize_phrase(o["head_noun"]) for o in objects]
    for k, key in enumerate(keys):
        if key in keys[:k]:
            problems.append(
                ("tag_inconsistent", f"objects {keys.index(key)} and {k} share the head noun {key!r}")
            )
    expressions = [normalize_phrase(o["expression"]) for o in objects]
    for k, e in enumerate(expressions):
        if e in expressions[:k]:
            problems.append(("ambiguous_expressions", f"objects {expressions.index(e)} and {k}: {e!r}"))
    return problems


def tag_problems(question: str, answer: str | None, objects: Sequence[dict]) -> list[tuple[str, str]]:
    """The tagged strings against the head nouns: what each tag is, that every object is tagged, the order."""
    try:
        q_spans = parse_tags(question)[1]
        a_spans = parse_tags(answer)[1] if answer is not None else []
    except TagError as e:
        return [("tag_malformed", str(e))]
    nouns = [normalize_phrase(o["head_noun"]) for o in objects]
    modifiers = {w for o in objects for w in words(o["expression"])} - set(nouns)
    problems = []
    for where, spans in (("question", q_spans), ("answer", a_spans)):
        for span in spans:
            tagged = normalize_phrase(span.phrase)
            if tagged in nouns:
                continue
            if tagged in DETERMINERS or tagged in PRONOUNS:
                code = "tag_determiner"
            elif tagged in COMMON_ADJECTIVES or tagged in modifiers:
                code = "tag_adjective"
            else:
                code = "tag_inconsistent"
            problems.append(
                (code, f"{where}: tagged {span.phrase!r} is not a head noun (head nouns: {nouns})")
            )
    if problems:
        return problems
    tagged_in_question = {normalize_phrase(s.phrase) for s in q_spans}
    for k, noun in enumerate(nouns):
        if noun not in tagged_in_question:
            problems.append(("tag_missing", f"object {k} ({noun!r}) is not tagged in the question"))
    order = list(dict.fromkeys(normalize_phrase(s.phrase) for s in [*q_spans, *a_spans]))
    if not problems and order != nouns:
        problems.append(("object_order", f"first mentions in the order {order}, expected {nouns}"))
    return problems


def language_problems(source_text: str, texts: Sequence[str]) -> list[tuple[str, str]]:
    problems = []
    for text in texts:
        leak = _PLACEHOLDER_RE.search(text)
        if leak:
            problems.append(("placeholder_leak", f"{leak.group()!r} in {text[:80]!r}"))
    source_words = {m.group().casefold() for m in _MASK_WORDS_RE.finditer(source_text)}
    for text in texts:
        for m in _MASK_WORDS_RE.finditer(text):
            if m.group().casefold() not in source_words:
                problems.append(("mask_language", f"{m.group()!r} in {text[:80]!r}"))
                break
    return problems


def literal_segments(text: str, *, drop_intro_line: bool = False) -> list[str]:
    """The text between placeholders, whitespace-normalised and case-folded (empty pieces dropped)."""
    if drop_intro_line:
        text = _INTRO_LINE_RE.sub("", text, count=1)
    return [s for s in (" ".join(p.split()).casefold() for p in _RAW_PLACEHOLDER_RE.split(text)) if s]


def keeps_segments(segments: Sequence[str], new_text: str) -> str | None:
    """None if every segment occurs in ``new_text`` in order; else the first one missing."""
    haystack, at = " ".join(new_text.split()).casefold(), 0
    for seg in segments:
        found = haystack.find(seg, at)
        if found < 0:
            return seg
        at = found + len(seg)
    return None


def growth_problems(source: str, new: str, max_words: int, slack: int, field: str) -> list[tuple[str, str]]:
    """``new`` may have the words of ``source`` outside its placeholders, ``max_words`` per placeholder, + slack."""
    n_placeholders = len(_RAW_PLACEHOLDER_RE.findall(source))
    budget = len(words(_RAW_PLACEHOLDER_RE.sub(" ", source))) + n_placeholders * max_words + slack
    n = len(words(strip_tags(new)))
    return [("text_too_long", f"{field}: {n} words, at most {budget} allowed")] if n > budget else []


def content_problems(record, question: str, answer: str | None, max_words: int = 12) -> list[tuple[str, str]]:
    """``record`` is the `RawRecord`; ``question`` / ``answer`` are the reply's (tags included)."""
    problems = growth_problems(record.question, question, max_words, 2 * max_words, "question")  # + an intro
    if answer is not None:
        problems += growth_problems(record.answer, answer, max_words, 4, "answer")
    missing = keeps_segments(literal_segments(record.question, drop_intro_line=True), strip_tags(question))
    if missing is not None:
        problems.append(("question_changed", f"{missing!r} of the source question is missing"))
    has_placeholders = bool(_RAW_PLACEHOLDER_RE.search(record.answer))
    if answer is None:
        if has_placeholders and record.kind not in ("bench_q", "bench_d"):
            problems.append(("answer_missing", "the answer has placeholders; return it rewritten"))
        return problems
    new_answer = strip_tags(answer)
    if record.kind in ("bench_q", "bench_d") or not has_placeholders:
        if " ".join(new_answer.split()) != " ".join(record.answer.split()):
            problems.append(("facts_changed", "the answer must stay word for word (only tags may be added)"))
        return problems
    missing = keeps_segments(literal_segments(record.answer), new_answer)
    if missing is not None:
        problems.append(("facts_changed", f"{missing!r} of the source answer is missing"))
    return problems


def alignment_problems(tokenizer, record_json: dict, source: str, n_objects: int, media_tokens: int):
    """Read the output record as training does and align its tags with the family's tokenizer."""
    try:
        record = record_from_json(record_json, source=source, index=0)
    except RecordError as e:
        return [("record", str(e))]
    sample = align_text(tokenizer, record.turns(), media=[("video", media_tokens)], n_objects=n_objects)
    problems = []
    if sample.skip_reason:
        problems.append(("token_alignment", sample.skip_reason))
    if sample.straddling:
        problems.append(("token_alignment", f"{sample.straddling} token(s) cross a tag edge"))
    if problems or not sample.spans:
        return problems
    ids, offsets = sample.text_ids, sample.offsets
    for start, end, phrase in sample.spans:
        inside = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and sample.text[s:e].strip()]
        lead = " " if start > 0 and sample.text[start - 1] == " " else ""
        alone = tokenizer(lead + phrase.strip(), add_special_tokens=False)["input_ids"]
        if [ids[i] for i in inside] != alone:
            problems.append(
                (
                    "token_alignment",
                    f"{phrase!r} gives other tokens in context than alone (tag after a space?)",
                )
            )
    return problems


def validate_reply(
    record,
    reply: dict[str, Any],
    *,
    tokenizer,
    make_output: Callable[[Any, dict[str, Any]], dict[str, Any]],
    config: CheckConfig = CheckConfig(),
) -> Verdict:
    """Check one logged reply (``content``, ``finish_reason``, ``refusal``) for the `RawRecord` ``record``.

    ``make_output(record, rewrite)`` builds the output record (`swim.data.nl_refer.build.refined_record`).
    """
    content, finish = reply.get("content"), reply.get("finish_reason")
    if reply.get("refusal"):
        return Verdict([("refusal", str(reply["refusal"])[:200])])
    if finish == "length":
        return Verdict([("truncated", "finish_reason is 'length'; raise --max-tokens or shorten the prompt")])
    if finish == "content_filter":
        return Verdict([("content_filter", "finish_reason is 'content_filter'")])
    if not isinstance(content, str) or not content.strip():
        return Verdict([("invalid_json", "empty reply")])
    try:
        parsed = parse_reply(content)
    except ValueError as e:
        code = "refusal" if _REFUSAL_RE.match(content) else "invalid_json"
        return Verdict([(code, f"{e}" if code == "invalid_json" else content[:200])])
    problems = check_schema(parsed, record.n_objects)
    if problems:
        return Verdict(problems)
    question, answer, objects = parsed["question"], parsed["answer"], parsed["objects"]
    texts = [question, *([answer] if answer is not None else []), *(o["expression"] for o in objects)]
    problems += language_problems(f"{record.question}\n{record.answer}", texts)
    problems += head_noun_problems(objects, config.max_expression_words)
    tags = tag_problems(question, answer, objects)
    problems += tags
    if any(code == "tag_malformed" for code, _ in tags):
        return Verdict(problems, parsed)
    problems += content_problems(record, question, answer, config.max_expression_words)
    if problems:
        return Verdict(problems, parsed)
    output = make_output(record, parsed)
    problems = alignment_problems(tokenizer, output, record.source, record.n_objects, config.media_tokens)
    return Verdict(problems, parsed, None if problems else output)
