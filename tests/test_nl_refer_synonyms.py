"""``swim data synonyms``: hand-made refined records, table and LLM (local stand-in server) sources, real Qwen
tokenizer for the alignment check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import VIDEO_HW, write_clip

from swim.data.masks import encode_mask
from swim.data.nl_refer.synonyms import (
    article_for,
    main,
    match_case,
    replace_in_text,
    same_word,
    table_candidates,
)
from swim.data.records import load_records

MASK = {"0": {"segmentation": encode_mask(np.ones(VIDEO_HW, np.uint8))}}
OPTIONS = ["(A) It sleeps.", "(B) It plays with the ball."]

CUB_DOG = {
    "id": 0,
    "video": "clip.mp4",
    "Question": "A lion <ins>cub</ins> sits next to a <ins>dog</ins>.\nWhat is the <ins>Cub</ins> doing near the "
    "<ins>dog</ins>?",
    "options": OPTIONS,
    "Answer": "(B) It plays with the ball.",
    "type": "Basic Questions",
    "annotation": [MASK, MASK],
}
ZEBRA = {  # no usable candidate: kept
    "id": 1,
    "video": "clip.mp4",
    "Question": "What is the <ins>zebra</ins> eating?",
    "options": ["(A) Grass", "(B) Leaves"],
    "Answer": "(A) Grass",
    "annotation": [MASK],
}
PLURAL_EDGE = {  # the tag leaves out the plural "s": any replacement straddles the tag edge
    "id": 2,
    "video": "clip.mp4",
    "Question": "Where are the two <ins>horse</ins>s going?",
    "options": ["(A) Left", "(B) Right"],
    "Answer": "(B) Right",
    "annotation": [MASK],
}
NL_REFER = {  # tags in question and answer
    "video": "clip.mp4",
    "index": "videorefer_qa_7",
    "conversations": [
        {"from": "human", "value": "<video>\nWhat is the <ins>man</ins> in the red shirt holding?"},
        {
            "from": "gpt",
            "value": "The <ins>man</ins> is holding a <ins>cup</ins> of coffee. The <ins>Man</ins> smiles.",
        },
    ],
    "annotation": [MASK, MASK],
}
TABLE = {
    "cub": ["cubs", "dog", "<region>", "whelp"],  # same_word, collides, placeholder_or_tag, then ok
    "dog": ["animal"],  # "a <ins>dog</ins>" -> "an <ins>animal</ins>"
    "zebra": ["zebras", "thing", "the", "striped horse"],  # same_word, generic, determiner, multiword
    "horse": ["stallion"],
    "man": ["someone", "guy"],  # determiner (pronoun), then ok
    "cup": ["Mug"],  # capitalised in the table, lower case in the text
}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_clip(tmp_path / "clip.mp4")
    (tmp_path / "bench.json").write_text(json.dumps([CUB_DOG, ZEBRA, PLURAL_EDGE, NL_REFER]))
    (tmp_path / "table.yaml").write_text(json.dumps(TABLE))  # JSON is YAML
    return tmp_path


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_words():
    assert same_word("dog", "Dogs") and same_word("box", "boxes") and same_word("puppy", "puppies")
    assert not same_word("dog", "hound")
    assert match_case("Cub", "whelp") == "Whelp" and match_case("CUB", "whelp") == "WHELP"
    assert match_case("cub", "Whelp") == "whelp" and match_case("set", "TV") == "TV"
    assert article_for("a", "animal") == "an" and article_for("An", "bird") == "A"
    assert (
        replace_in_text("An <ins>owl</ins>, a <ins> owl </ins>", {"owl": "bird"})
        == "A <ins>bird</ins>, a <ins> bird </ins>"
    )
    table = {"dog": ["hound"], "box": ["crate"]}
    assert table_candidates(table, "Dogs") == ["hounds"] and table_candidates(table, "boxes") == ["crates"]
    assert table_candidates(table, "cat") == []


def test_table_source(data: Path, qwen_tokenizer_dir: Path):
    out = data / "bench-synonym.json"
    args = ["--out", str(out), "--source", "table", "--table", str(data / "table.yaml"), "--tokenizer", str(qwen_tokenizer_dir)]  # fmt: skip
    assert run([str(data / "bench.json"), *args]) == 0
    records = json.loads(out.read_text())
    assert len(out.read_text().splitlines()) == 2 + len(records)  # one record per line
    cub, zebra, horse, nl = records

    assert cub["Question"] == (
        "A lion <ins>whelp</ins> sits next to an <ins>animal</ins>.\nWhat is the <ins>Whelp</ins> doing near the "
        "<ins>animal</ins>?"
    )
    assert cub["synonyms"] == [
        {"object": 0, "original": "cub", "synonym": "whelp"},
        {"object": 1, "original": "dog", "synonym": "animal"},
    ]
    for key in ("options", "Answer", "annotation", "id", "type", "video"):
        assert cub[key] == CUB_DOG[key]

    assert zebra["Question"] == ZEBRA["Question"]
    assert zebra["synonyms"] == [{"object": 0, "original": "zebra", "synonym": None,
                                  "kept": ["same_word", "generic", "determiner", "multiword"]}]  # fmt: skip
    assert horse["Question"] == PLURAL_EDGE["Question"]
    assert horse["synonyms"][0]["kept"] == ["not_single_token_safe"]

    assert nl["conversations"][0]["value"] == "<video>\nWhat is the <ins>guy</ins> in the red shirt holding?"
    assert nl["conversations"][1]["value"] == "The <ins>guy</ins> is holding a <ins>mug</ins> of coffee. The <ins>Guy</ins> smiles."  # fmt: skip
    assert nl["synonyms"][1] == {"object": 1, "original": "cup", "synonym": "mug"}
    assert nl["index"] == NL_REFER["index"] and nl["annotation"] == NL_REFER["annotation"]

    stats = json.loads((out.parent / "bench-synonym.stats.json").read_text())
    assert stats["records"] == 4 and stats["objects"] == 6 and stats["replaced"] == 4 and stats["kept"] == 2
    assert stats["kept_by_reason"] == {"determiner": 1, "generic": 1, "multiword": 1, "not_single_token_safe": 1,
                                       "same_word": 1}  # fmt: skip
    assert (
        stats["rejected_candidates"]["collides"] == 1
        and stats["rejected_candidates"]["placeholder_or_tag"] == 1
    )
    assert stats["source"] == "table"

    loaded, _ = load_records(out)
    assert [r.kind for r in loaded] == ["bench_q", "bench_q", "bench_q", "nl_refer"]
    from swim.data.validate import main as validate

    assert run_validate(validate, out) == 0

    # --strict: the same run exits 1 because two objects kept their noun
    assert run([str(data / "bench.json"), *args, "--strict"]) == 1
    # an object with no table entry: kept as no_candidates
    (data / "small.yaml").write_text("cub: [whelp]\n")
    args2 = ["--out", str(data / "o2.json"), "--table", str(data / "small.yaml"), "--tokenizer", str(qwen_tokenizer_dir)]  # fmt: skip
    assert run([str(data / "bench.json"), *args2]) == 0
    stats2 = json.loads((data / "o2.stats.json").read_text())
    assert stats2["replaced"] == 1 and stats2["kept_by_reason"] == {"no_candidates": 5}


def run_validate(validate, path: Path) -> int:
    try:
        validate([str(path)])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_llm_source_caches_replies_and_retries_once(data: Path, qwen_tokenizer_dir: Path):
    pytest.importorskip("openai")
    from swim.data.nl_refer.local_llm import LocalLLMServer, Reply
    from swim.data.nl_refer.prompt import payload_from_messages

    first = {
        "cub": ["whelp"],
        "dog": ["dogs"],
        "zebra": [],
        "horse": ["stallion"],
        "man": ["guy"],
        "cup": ["mug"],
    }
    retry = {"dog": ["hound"]}
    seen: list[dict] = []

    def responder(body: dict) -> Reply:
        seen.append(body)
        payload = payload_from_messages(body["messages"])
        table = retry if len(body["messages"]) > 2 else first
        if "zebra" in payload["question"] and table is first:
            return Reply(content="Sure! Here are some synonyms: stripe-horse")  # not JSON: retried
        entries = [
            {"object": o["object"], "candidates": table.get(o["noun"].lower(), [])}
            for o in payload["objects"]
        ]
        return Reply(content=json.dumps({"synonyms": entries}))

    out = data / "llm" / "bench-synonym.json"
    with LocalLLMServer(responder) as server:
        argv = [str(data / "bench.json"), "--out", str(out), "--source", "llm", "--llm", server.base_url,
                "--model", "local-llm", "--tokenizer", str(qwen_tokenizer_dir), "--no-fsync"]  # fmt: skip
        assert run(argv) == 0
        # one request per record; a retry for the records with an object left: cub/dog (dog -> "dogs"), zebra,
        # horse (straddles)
        assert server.received == 4 + 3
        retries = [b["messages"][-1]["content"] for b in seen if len(b["messages"]) > 2]
        retry_text = next(t for t in retries if "'dogs'" in t)
        assert "object 1 ('dog'): 'dogs': same_word" in retry_text and "object 0" not in retry_text
        result = out.read_text()
        cub = json.loads(result)[0]
        assert cub["Question"].startswith("A lion <ins>whelp</ins> sits next to a <ins>hound</ins>.")
        stats = json.loads((out.parent / "bench-synonym.stats.json").read_text())
        assert stats["prompt_version"] == "synonyms-v1" and stats["requests"]["sent_this_run"] == 7
        assert stats["replaced"] == 4 and stats["kept"] == 2
        assert json.loads(result)[1]["synonyms"][0]["kept"] == ["invalid_reply", "no_candidates"]
        assert (out.parent / "synonyms_responses.jsonl").is_file()

        # a rerun sends nothing and writes the same output
        assert run(argv) == 0
        assert server.received == 7
        assert out.read_text() == result
        assert (
            json.loads((out.parent / "bench-synonym.stats.json").read_text())["requests"]["sent_this_run"]
            == 0
        )


def test_llm_failed_requests_keep_the_nouns_and_exit_3(data: Path, qwen_tokenizer_dir: Path):
    pytest.importorskip("openai")
    from swim.data.nl_refer.local_llm import LocalLLMServer, Reply

    out = data / "failed" / "bench-synonym.json"
    with LocalLLMServer(lambda body: Reply(status=500, content="down")) as server:
        argv = [str(data / "bench.json"), "--out", str(out), "--source", "llm", "--llm", server.base_url,
                "--model", "local-llm", "--tokenizer", str(qwen_tokenizer_dir), "--max-retries", "0", "--no-fsync"]  # fmt: skip
        assert run(argv) == 3
    records = json.loads(out.read_text())
    assert records[0]["Question"] == CUB_DOG["Question"]
    assert {e["kept"][0] for r in records for e in r["synonyms"]} == {"request_failed"}
    assert (out.parent / "synonyms_responses.jsonl").read_text() == ""  # failures are never cached
