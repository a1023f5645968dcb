"""The reply checks of ``swim data build`` on hand-made replies with known verdicts, with the real Qwen tokenizer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from swim.data.masks import encode_mask
from swim.data.nl_refer.build import refined_record, validation_base
from swim.data.nl_refer.checks import REASONS, validate_reply

QA_QUESTION = "There are 2 objects in the video: <object0><region>, <object1><region>.\nWhat is <object1> doing to <object0>?"
QA_ANSWER = "<object1> is chasing <object0> across the grass."


def raw(kind="qa", question=QA_QUESTION, answer=QA_ANSWER, n_objects=2):
    obj = {
        "id": "r1",
        "video": "/data/v.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\n" + question},
            {"from": "gpt", "value": answer},
        ],
        "annotation": [
            {"0": {"segmentation": encode_mask(np.ones((4, 4), np.uint8))}} for _ in range(n_objects)
        ],
    }
    if kind == "bench_q":
        obj = {"id": 3, "video": "/data/v.mp4", "Question": question, "options": ["(A) Yes", "(B) No"],
               "Answer": answer, "annotation": obj["annotation"]}  # fmt: skip
    return SimpleNamespace(kind=kind, question=question, answer=answer, n_objects=n_objects, source="in.json",
                           position=0, index="videorefer_qa_0", id="r1", video="/data/v.mp4", obj=obj)  # fmt: skip


GOOD = {
    "objects": [
        {"object": 0, "expression": "the small brown dog", "head_noun": "dog"},
        {"object": 1, "expression": "the boy in the red shirt", "head_noun": "boy"},
    ],
    "question": "There are two animals and people here: the small brown <ins>dog</ins> and the <ins>boy</ins> in "
    "the red shirt.\nWhat is the <ins>boy</ins> doing to the <ins>dog</ins>?",
    "answer": "The <ins>boy</ins> is chasing the <ins>dog</ins> across the grass.",
}


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def verdict(tokenizer, reply, record=None, **entry):
    record = record or raw()
    content = reply if isinstance(reply, str) else json.dumps(reply)
    entry = {"content": content, "finish_reason": "stop", "refusal": None, **entry}
    make = lambda r, rw: refined_record(validation_base(r), r, rw, None)  # noqa: E731
    return validate_reply(record, entry, tokenizer=tokenizer, make_output=make)


def edited(**changes):
    reply = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key[:2] in ("o0", "o1"):  # o0_head_noun=..., o1_expression=...
            k, field = int(key[1]), key[3:]
            reply["objects"][k][field] = value
        else:
            reply[key] = value
    return reply


def test_good_reply_passes_and_builds_the_output_record(tokenizer):
    v = verdict(tokenizer, GOOD)
    assert v.ok, v.problems
    turns = v.record["conversations"]
    assert turns[0]["value"].startswith("<video>\nThere are two")
    assert v.record["objects"][1] == {"expression": "the boy in the red shirt", "head_noun": "boy"}


@pytest.mark.parametrize(
    "reply, code",
    [
        (
            edited(question=GOOD["question"].replace("the <ins>boy</ins> doing", "<object1> doing")),
            "placeholder_leak",
        ),
        (edited(question=GOOD["question"] + " <region>"), "placeholder_leak"),
        (
            edited(
                o0_head_noun="small",
                question=GOOD["question"]
                .replace("small brown <ins>dog</ins>", "<ins>small</ins> brown dog")
                .replace("the <ins>dog</ins>?", "the <ins>small</ins>?"),
                answer=GOOD["answer"].replace("<ins>dog</ins>", "<ins>small</ins>"),
            ),
            "tag_adjective",
        ),  # fmt: skip
        (edited(o0_head_noun="the"), "tag_determiner"),
        (
            edited(answer=GOOD["answer"].replace("the <ins>dog</ins>", "the <ins>puppy</ins>")),
            "tag_inconsistent",
        ),
        (edited(o1_head_noun="dog", o1_expression="the other dog"), "tag_inconsistent"),
        (
            edited(
                question="What is the <ins>boy</ins> in the red shirt doing to the small brown <ins>dog</ins>?"
            ),
            "object_order",
        ),
        (
            edited(answer="The <ins>boy</ins> is walking the <ins>dog</ins> across the grass."),
            "facts_changed",
        ),
        (edited(question=GOOD["question"].replace("doing to", "saying to")), "question_changed"),
        (
            edited(
                question=GOOD["question"].replace("red shirt.", "red shirt, outlined by the red contour.")
            ),
            "mask_language",
        ),
        (
            edited(question=GOOD["question"].replace("<ins>dog</ins>", "dog")),
            "tag_missing",
        ),
        (
            edited(
                o0_expression="the small brown dog that sits on the left side of the big green field at dawn"
            ),
            "expression_too_long",
        ),
        (edited(o0_head_noun="thing", o0_expression="the small brown thing"), "generic_head_noun"),
        (edited(o0_head_noun="cat"), "head_noun_not_in_expression"),
        (
            edited(answer=GOOD["answer"].replace("grass.", "grass, " + "very " * 30 + "slowly.")),
            "text_too_long",
        ),
        (
            edited(question=GOOD["question"].replace("<ins>dog</ins>?", "<ins>dog</ins>?</ins>")),
            "tag_malformed",
        ),
        (edited(answer=None), "answer_missing"),
        (edited(objects=GOOD["objects"][:1]), "object_count"),
        (edited(objects=GOOD["objects"][::-1]), "object_order"),
        (edited(question=GOOD["question"].replace("<ins>dog</ins>?", "<ins>dog</ins>s?")), "token_alignment"),
        ({"objects": "dog", "question": "q", "answer": None}, "schema"),
        (json.dumps(GOOD)[:-10], "invalid_json"),
        ("I'm sorry, but I can't help with that.", "refusal"),
    ],
)
def test_each_defect_has_its_own_reason(tokenizer, reply, code):
    v = verdict(tokenizer, reply)
    assert not v.ok and code in v.codes, v.problems
    assert set(v.codes) <= set(REASONS)


def test_transport_level_verdicts(tokenizer):
    assert verdict(tokenizer, GOOD, finish_reason="length").codes == ["truncated"]
    assert verdict(tokenizer, GOOD, refusal="I can't help").codes == ["refusal"]
    assert verdict(tokenizer, "```json\n" + json.dumps(GOOD) + "\n```").ok  # a fenced reply is fine
    assert verdict(tokenizer, "Here is the JSON:\n" + json.dumps(GOOD) + "\nDone.").ok  # and one inside prose


def test_kept_answers_must_stay_word_for_word(tokenizer):
    record = raw("bench_q", "What is <object3><region> holding?", "(A) Yes", 1)
    reply = {"objects": [{"object": 0, "expression": "the tall woman", "head_noun": "woman"}],
             "question": "What is the tall <ins>woman</ins> holding?", "answer": None}  # fmt: skip
    v = verdict(tokenizer, reply, record)
    assert v.ok, v.problems
    assert v.record["Question"] == "What is the tall <ins>woman</ins> holding?"
    assert v.record["Answer"] == "(A) Yes" and v.record["options"] == ["(A) Yes", "(B) No"]
    assert "facts_changed" in verdict(tokenizer, {**reply, "answer": "(B) No"}, record).codes
    assert verdict(tokenizer, {**reply, "answer": "(A) Yes"}, record).ok  # returned unchanged: fine


def test_feedback_lists_every_problem(tokenizer):
    v = verdict(tokenizer, edited(o0_head_noun="the", answer="The boy runs."))
    lines = v.feedback()
    assert len(lines) == len(v.problems) >= 2 and all(line.startswith("- ") for line in lines)


def test_prompt_file_is_versioned_and_complete():
    from swim.data.nl_refer.prompt import PromptTemplate, build_messages, payload_from_messages

    template = PromptTemplate.load()
    assert template.version == "rewrite-v1" and "{reasons}" in template.retry
    payload = {"id": "x", "question": "What is <region> doing?", "objects": [{"object": 0}]}
    messages = build_messages(template, payload, previous=("{}", ["- schema: bad"]))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert payload_from_messages(messages) == payload and "- schema: bad" in messages[-1]["content"]
    assert template.text.startswith("version: rewrite-v1")  # the file's whole text goes into request ids
