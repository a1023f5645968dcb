"""VideoRefer-Bench-Q: prompt text, answer-letter parsing, scoring, and sharded runs equal to one process."""

from __future__ import annotations

import json

import pytest
from fixtures_eval import CPU_FLAGS, SMALL_VIDEO_FLAGS, append_records, synth_benches, talkative_checkpoint

from swim.eval import bench_q
from swim.eval.bench_q import clean_text, ground_truth_letter, parse_answer_letter, split_options, summarize

OPTIONS = ["(A) A helmet", "(B) A hat", "(C) Sunglasses", "(D) A watch"]


@pytest.mark.parametrize(
    "answer, letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("B.", "B"),
        ("b", "B"),
        ("**B**", "B"),
        ("(B) A hat", "B"),
        ("B. A hat", "B"),
        ("Answer: B", "B"),
        ("answer: c", "C"),
        ("The answer is (C).", "C"),
        ("The correct answer is D", "D"),
        ("Option D is right.", "D"),
        ("A hat", "B"),  # the option's text, not the article "A"
        ("a hat.", "B"),
        ("The man is wearing sunglasses.", "C"),
        ("A helmet", "A"),
        ("C is correct", "C"),
    ],
)
def test_parse_answer_letter(answer, letter):
    assert parse_answer_letter(answer, OPTIONS)[0] == letter


@pytest.mark.parametrize(
    "answer, method",
    [("", "empty"), (None, "empty"), ("   ", "empty"), ("I don't know.", "unparsed"), ("E", "unparsed"),
     ("B or C", "unparsed"), ("A man stands there.", "unparsed")],
)  # fmt: skip
def test_unparsable_answers_give_no_letter(answer, method):
    assert parse_answer_letter(answer, OPTIONS) == (None, method)


def test_options_without_letters_are_lettered_by_position():
    assert split_options(["Up", "Down"]) == (["A", "B"], ["Up", "Down"])
    assert split_options(["A. Up", "B. Down"]) == (["A", "B"], ["Up", "Down"])
    assert bench_q.format_options(["Up", "Down"]) == ["(A) Up", "(B) Down"]
    assert parse_answer_letter("down", ["Up", "Down"])[0] == "B"


def test_ground_truth_letter():
    assert ground_truth_letter("(A) A helmet", OPTIONS) == "A"
    assert ground_truth_letter("C", OPTIONS) == "C"
    assert ground_truth_letter("A watch", OPTIONS) == "D"
    assert ground_truth_letter("(E) A shoe", OPTIONS) is None
    assert ground_truth_letter("a shoe", OPTIONS) is None


def test_clean_text_handles_refined_and_original_questions():
    assert clean_text("What is the <ins>man</ins> in red holding?") == "What is the man in red holding?"
    assert clean_text("What is <object3><region> not wearing?") == "What is object 3 not wearing?"
    assert clean_text("Is <object0><region> left of <object1><region>?") == "Is object 0 left of object 1?"
    assert clean_text("<video>\nWhat does <region> do ?") == "What does the object do?"
    assert clean_text("An <ins>unclosed tag") == "An unclosed tag"


def test_prompt_layout(tmp_path):
    bench = tmp_path / "q.json"
    record = {"video": "v.mp4", "Question": "What is the <ins>dog</ins> doing?", "type": "Basic Questions",
              "options": ["(A) Running", "(B) Sleeping"], "Answer": "(B) Sleeping"}  # fmt: skip
    bench.write_text(json.dumps([record]))
    items, invalid = bench_q.load_items(bench, tmp_path, None)
    assert not invalid
    assert items[0].prompt == (
        "What is the dog doing?\n(A) Running\n(B) Sleeping\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert (
        "<video>" not in items[0].prompt and items[0].gt == "B" and items[0].video == str(tmp_path / "v.mp4")
    )


def test_accuracy_is_a_micro_average_over_questions():
    def pred(t, correct, **kw):
        return {"key": "k", "id": 0, "type": t, "correct": correct, "pred": "A", "parse": "letter",
                "error": None, "raw": "A", **kw}  # fmt: skip

    preds = [pred("Basic Questions", True), pred("Basic Questions", True), pred("Basic Questions", False),
             pred("Future Predictions", True), pred("Future Predictions", False, pred=None, parse="unparsed"),
             pred("Future Predictions", False, error="VideoDecodeError", parse="error")]  # fmt: skip
    s = summarize(preds)
    assert s["n_questions"] == 6 and s["n_correct"] == 3 and s["accuracy"] == pytest.approx(50.0)
    assert s["per_type"]["Basic Questions"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(200 / 3)}
    assert list(s["per_type"]) == ["Basic Questions", "Future Predictions"]
    assert s["n_parse_failures"] == 1 and s["n_errors"] == 1


# ---------------------------------------------------------------------------------------------------------
# End to end on the tiny model


@pytest.fixture(scope="module")
def model_dir(tiny_ckpt, tmp_path_factory):
    return talkative_checkpoint(tiny_ckpt, tmp_path_factory.getbasetemp() / "tiny-talkative")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchq")
    path = synth_benches(root, n_q=5, n_d=0)["bench_q"]
    original = json.loads(path.read_text())[0] | {"Question": "Where does <object0><region> go?", "id": 100}
    append_records(
        path,
        [
            original,  # VideoRefer's original format
            original | {"id": 101, "video": "videos/missing.mp4"},  # cannot be decoded: counted wrong
            original | {"id": 102, "Answer": "(F) Nowhere"},  # no ground truth: invalid, left out
            {"id": 103, "video": "videos/x.mp4"},  # malformed: invalid, left out
        ],
    )
    return path


def _args(model_dir, bench, out, *extra):
    return ["--model", str(model_dir), "--bench", str(bench), "--out", str(out), "--max-new-tokens", "4",
            *SMALL_VIDEO_FLAGS, *CPU_FLAGS, *extra]  # fmt: skip


def test_end_to_end_counts_every_question(model_dir, bench, tmp_path):
    results = bench_q.run(_args(model_dir, bench, tmp_path, "--batch-size", "3"))
    assert results["n_questions"] == 7  # 5 synthetic + original + missing video
    assert results["n_invalid_records"] == 2
    assert {r["index"] for r in results["invalid_records"]} == {7, 8}
    assert results["n_errors"] == 1 and "VideoDecodeError" in results["errors"][0]["error"]
    assert results["n_correct"] + results["n_parse_failures"] + results["n_errors"] <= 7
    assert sum(t["n"] for t in results["per_type"].values()) == 7
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in predictions] == list(range(7))
    assert sum(p["correct"] for p in predictions) == results["n_correct"]
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_sharded_run_merges_to_the_single_process_result(model_dir, bench, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    bench_q.run(_args(model_dir, bench, single, "--batch-size", "2"))
    for i in range(2):
        assert bench_q.run(_args(model_dir, bench, sharded, "--batch-size", "2", "--num-shards", "2",
                                 "--shard-index", str(i))) is None  # fmt: skip
    assert not (sharded / "results.json").exists()
    merged = bench_q.run(["--merge", "--out", str(sharded)])  # bench and limit read from the shard headers
    assert merged["n_questions"] == 7
    for name in ("results.json", "predictions.jsonl"):
        assert (sharded / name).read_bytes() == (single / name).read_bytes()


def test_merge_refuses_missing_shards(model_dir, bench, tmp_path):
    bench_q.run(_args(model_dir, bench, tmp_path, "--num-shards", "2", "--shard-index", "1", "--limit", "2"))
    with pytest.raises(FileNotFoundError, match=r"shard-00-of-02"):
        bench_q.run(["--merge", "--out", str(tmp_path)])


def test_rerun_resumes_and_retries_only_failures(model_dir, bench, tmp_path, monkeypatch):
    first = bench_q.run(_args(model_dir, bench, tmp_path))
    seen: list[list[str]] = []
    original_run = bench_q.Generator.run

    def spy(self, items, on_output, **kw):
        seen.append([it.key for it in items])
        return original_run(self, items, on_output, **kw)

    monkeypatch.setattr(bench_q.Generator, "run", spy)
    second = bench_q.run(_args(model_dir, bench, tmp_path))
    assert seen == [["6"]]  # only the item whose video failed is tried again
    assert second == first


def test_changed_settings_do_not_mix_with_old_answers(model_dir, bench, tmp_path):
    bench_q.run(_args(model_dir, bench, tmp_path, "--limit", "1"))
    with pytest.raises(ValueError, match="--overwrite"):
        bench_q.run(_args(model_dir, bench, tmp_path, "--limit", "1", "--system-prompt", "none"))
    results = bench_q.run(_args(model_dir, bench, tmp_path, "--limit", "1", "--system-prompt", "none",
                                "--overwrite"))  # fmt: skip
    assert results["config"]["generation"]["system_prompt"] is None
