"""``swim data build`` end to end against the local OpenAI-compatible stand-in server (127.0.0.1).

Synthetic raw VideoRefer files (`swim data synth --format videorefer`) are rewritten through the real `openai`
client; the server's deterministic responder reads the scene description, and its fault injector produces each
defect a real LLM produces. What is checked: outputs readable by the training readers and `swim validate`; every
fault rejected with its own code after one retry, or accepted after a good retry; transport faults retried;
malformed input never sent; SIGKILL at three moments then resume == an uninterrupted run, with no successful
request sent twice (counted on the server); the Batch back-end (with expired lines resubmitted) and a stand-in
`vllm` module give the same outputs; budget, dry run and --reparse send nothing they should not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from swim.data.nl_refer.build import ResponseLog
from swim.data.nl_refer.build import main as build_main
from swim.data.nl_refer.local_llm import FaultResponder, LocalLLMServer, Reply, SceneResponder
from swim.data.nl_refer.prompt import payload_from_messages
from swim.data.records import load_records
from swim.data.synth.cli import main as synth_main

REPO = Path(__file__).resolve().parents[1]
SYNTH_FLAGS = [
    "--size",
    "32",
    "--frames",
    "4",
    "--object-size",
    "10",
    "--speed",
    "2",
    "--max-distractors",
    "1",
]


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    synth_main([str(out), "--format", "videorefer", "--num-train", "6", "--num-val", "14", "--num-bench-q", "4",
                "--num-bench-d", "3", *SYNTH_FLAGS])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def scenes(raw_data) -> SceneResponder:
    return SceneResponder.from_file(raw_data / "scenes.json")


def run_build(inputs, out: Path, kind: str, url: str | None, tokenizer: Path, *extra: str) -> int:
    argv = [*map(str, inputs), "--out", str(out), "--kind", kind, "--model", "local", "--tokenizer", str(tokenizer),
            "--concurrency", "4", "--backoff-s", "0.01", "--no-fsync", *extra]  # fmt: skip
    if url:
        argv += ["--llm", url]
    try:
        build_main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def ids_of(raw_data: Path, name: str) -> list[str]:
    return [str(r["id"]) for r in json.loads((raw_data / name).read_text())]


def rejected(out: Path) -> dict[str, dict]:
    return {str(r["id"]): r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(raw_data, scenes, qwen_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs of every kind, each record's reply good at once."""
    outs = {}
    with LocalLLMServer(scenes) as server:
        for kind, name in [("qa", "videorefer-qa.json"), ("detailed", "videorefer-detailed-caption.json"),
                           ("bench_q", "VideoRefer-Bench-Q.json"), ("bench_d", "VideoRefer-Bench-D.json")]:  # fmt: skip
            outs[kind] = tmp_path_factory.mktemp(f"ref_{kind}")
            assert run_build([raw_data / name], outs[kind], kind, server.base_url, qwen_tokenizer_dir) == 0
        outs["received"] = server.received
    return outs


def test_outputs_read_as_released_files_and_a_rerun_sends_nothing(
    reference, raw_data, scenes, qwen_tokenizer_dir
):
    from swim.data.validate import main as validate_main

    qa = reference["qa"] / "refined-format-videorefer-qa.json"
    records, problems = load_records(qa)
    assert not problems and len(records) == 14
    assert all(
        "qa" in r.index and "videorefer" in r.index and "<ins>" in r.conversations[0].text for r in records
    )
    assert all(Path(r.video).is_absolute() for r in records)
    two_objects = [r for r in records if len(r.annotation) == 2]
    assert two_objects and all(
        "<ins>" in r.conversations[1].text for r in two_objects
    )  # answers rewritten too
    bench_q, _ = load_records(reference["bench_q"] / "refined-VideoRefer-Bench-Q.json")
    source = json.loads((raw_data / "VideoRefer-Bench-Q.json").read_text())
    assert [(r.options, r.answer) for r in bench_q] == [(tuple(s["options"]), s["Answer"]) for s in source]
    assert all(r.kind == "bench_q" and "<ins>" in r.question and "<object" not in r.question for r in bench_q)
    bench_d, _ = load_records(reference["bench_d"] / "refined-VideoRefer-Bench-D.json")
    assert [r.caption for r in bench_d] == [
        s["caption"] for s in json.loads((raw_data / "VideoRefer-Bench-D.json").read_text())
    ]
    outputs = [str(reference[k] / n) for k, n in [("qa", qa.name), ("detailed", "refined-format-videorefer-detailed-caption.json"),
               ("bench_q", "refined-VideoRefer-Bench-Q.json"), ("bench_d", "refined-VideoRefer-Bench-D.json")]]  # fmt: skip
    for path in outputs:
        with pytest.raises(SystemExit) as e:
            validate_main([path])
        assert e.value.code == 0, path
    stats = json.loads((reference["qa"] / "stats.json").read_text())
    assert (
        stats["accepted"] == 14 and stats["prompt_version"] == "rewrite-v1" and stats["tokens"]["prompt"] > 0
    )
    record = json.loads(qa.read_text().splitlines()[1].rstrip(","))
    assert record["meta"]["prompt_version"] == "rewrite-v1" and record["meta"]["request_id"].startswith(
        "req-"
    )
    before = qa.read_bytes()
    with LocalLLMServer(scenes) as server:
        assert (
            run_build(
                [raw_data / "videorefer-qa.json"], reference["qa"], "qa", server.base_url, qwen_tokenizer_dir
            )
            == 0
        )
        assert server.received == 0
    assert qa.read_bytes() == before


CONTENT_FAULTS = {  # fault -> the reason code it must produce
    "leak_region": "placeholder_leak",
    "leak_object": "placeholder_leak",
    "tag_adjective": "tag_adjective",
    "tag_determiner": "tag_determiner",
    "inconsistent_tags": "tag_inconsistent",
    "changed_facts": "facts_changed",
    "mask_language": "mask_language",
    "invalid_json": "invalid_json",
    "truncated": "truncated",
    "refusal": "refusal",
    "swapped_order": "object_order",  # needs a two-object record: odd positions of the QA file
}


def test_each_fault_is_retried_once_then_rejected_with_its_reason(
    raw_data, scenes, qwen_tokenizer_dir, tmp_path
):
    qa_ids = ids_of(raw_data, "videorefer-qa.json")
    single = [i for k, i in enumerate(qa_ids) if k % 2 == 0]
    double = [i for k, i in enumerate(qa_ids) if k % 2 == 1]
    faults, expected = {}, {}
    pool = iter(single + double[1:])
    for fault, code in CONTENT_FAULTS.items():
        rid = double[0] if fault == "swapped_order" else next(pool)
        faults[rid], expected[rid] = [fault, fault], code
    det_ids = ids_of(raw_data, "videorefer-detailed-caption.json")
    transport = {
        det_ids[0]: ["http_429"],
        det_ids[1]: ["http_500", "http_500"],
        det_ids[2]: ["reset"],
        det_ids[3]: ["hang"],
        det_ids[4]: ["leak_region"],
    }  # fmt: skip  (the last: a good retry)
    responder = FaultResponder(scenes, {**faults, **transport}, hang_s=1.0)
    with LocalLLMServer(responder) as server:
        out = tmp_path / "qa"
        assert (
            run_build([raw_data / "videorefer-qa.json"], out, "qa", server.base_url, qwen_tokenizer_dir) == 0
        )
        det = tmp_path / "det"
        code = run_build([raw_data / "videorefer-detailed-caption.json"], det, "detailed", server.base_url,
                         qwen_tokenizer_dir, "--timeout-s", "0.5")  # fmt: skip
        assert code == 0
    bad = rejected(out)
    assert set(bad) == set(expected)
    for rid, code in expected.items():
        assert bad[rid]["stage"] == "reply" and code in bad[rid]["codes"], (rid, bad[rid])
        assert code in bad[rid]["first_codes"] and len(bad[rid]["request_ids"]) == 2
    assert all("raw" in r for r in bad.values())
    accepted = {str(r.id) for r in load_records(out / "refined-format-videorefer-qa.json")[0]}
    assert accepted.isdisjoint(bad) and len(accepted) + len(bad) == len(qa_ids)
    stats = json.loads((det / "stats.json").read_text())
    assert stats["accepted"] == 6 and stats["accepted_after_retry"] == 1, stats
    assert server.statuses[429] == 1 and server.statuses[500] == 2
    assert stats["requests"]["transport_retries_this_run"] == 5  # 429, 500 twice, reset, hang


def test_malformed_input_records_are_reported_and_never_sent(raw_data, scenes, qwen_tokenizer_dir, tmp_path):
    records = json.loads((raw_data / "videorefer-qa.json").read_text())[:5]
    records[0]["annotation"][0][next(iter(records[0]["annotation"][0]))]["segmentation"]["counts"] = "%%%"
    records[1]["conversations"][0]["value"] += " <region>"
    records[2]["video"] = "videos/missing.mp4"
    records[3]["conversations"][1]["value"] = "<object7> moves."
    path = raw_data / "bad-qa.json"
    path.write_text(json.dumps(records))
    with LocalLLMServer(scenes) as server:
        assert run_build([path], tmp_path, "qa", server.base_url, qwen_tokenizer_dir) == 0
        assert server.received == 1
    bad = rejected(tmp_path)
    codes = {
        rid: bad[str(records[i]["id"])]["codes"] for i, rid in enumerate(["rle", "count", "video", "object"])
    }
    assert codes == {"rle": ["mask_decode"], "count": ["placeholder_count"], "video": ["missing_video"],
                     "object": ["unknown_object"]}  # fmt: skip
    assert all(r["stage"] == "input" for r in bad.values())


def test_killed_three_times_then_resumed_equals_an_uninterrupted_run(
    raw_data, scenes, qwen_tokenizer_dir, tmp_path
):
    """SIGKILL arrives while a request is in flight (the server kills the client on chosen requests).

    Two records get a bad first reply (one is accepted after its retry, one rejected), decided by the request's
    content, not its arrival, so that the killed and the uninterrupted runs see the same replies. One request at a
    time: with N in flight, a reply that reached the client in the instant before the kill but was not yet logged
    is requested again (at most N - 1 per kill; docs/nl_refer_build.md).
    """
    ids = ids_of(raw_data, "videorefer-qa.json")
    retried, rejected_id = ids[3], ids[8]

    def responder(body: dict) -> Reply:
        reply = scenes(body)
        rid, retry = payload_from_messages(body["messages"])["id"], len(body["messages"]) > 2
        if rid == rejected_id or (rid == retried and not retry):
            reply.content = reply.content[:-10]  # invalid JSON
        return reply

    kill_at = np.random.default_rng(0).integers(1, 6, size=3).tolist()  # the n-th request of runs 1, 2, 3
    run: dict[str, object] = {"n": 0, "requests": 0}

    def on_request(count: int, body: dict) -> None:
        run["requests"] += 1
        if run["n"] < 3 and run["requests"] == kill_at[run["n"]]:
            run["proc"].send_signal(signal.SIGKILL)
            run["proc"].wait()

    qa = raw_data / "videorefer-qa.json"
    with LocalLLMServer(responder) as server:
        assert run_build([qa], tmp_path / "reference", "qa", server.base_url, qwen_tokenizer_dir) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "swim.cli", "data", "build", str(qa), "--out", str(out), "--kind", "qa",
           "--model", "local", "--tokenizer", str(qwen_tokenizer_dir), "--concurrency", "1"]  # fmt: skip
    codes = []
    with LocalLLMServer(responder, on_request=on_request) as server:
        for _ in range(5):
            run["requests"] = 0
            run["proc"] = subprocess.Popen([*cmd, "--llm", server.base_url], cwd=REPO, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)  # fmt: skip
            codes.append(run["proc"].wait(timeout=120))
            run["n"] += 1
            if codes[-1] == 0:
                break
    assert codes == [-signal.SIGKILL] * 3 + [0]
    for name in ("refined-format-videorefer-qa.json", "rejected.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    accepted = [r["id"] for r in json.loads((out / "refined-format-videorefer-qa.json").read_text())]
    assert sorted([*accepted, *rejected(out)]) == sorted(ids) and list(rejected(out)) == [rejected_id]
    assert set(server.served.values()) == {1}  # no request that succeeded was sent again
    assert sum(server.served.values()) == len(ResponseLog(out / "responses.jsonl")) == 16  # 14 + 2 retries


def test_response_log_cuts_a_partial_last_line(tmp_path):
    log = ResponseLog(tmp_path / "log.jsonl")
    log.append({"request_id": "a", "content": "x"})
    log.close()
    with (tmp_path / "log.jsonl").open("ab") as f:
        f.write(b'{"request_id": "b", "cont')  # killed mid-write
    log = ResponseLog(tmp_path / "log.jsonl")
    assert "a" in log and "b" not in log
    log.append({"request_id": "b", "content": "y"})
    assert [json.loads(line)["request_id"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [
        "a",
        "b",
    ]


def test_batch_backend_resubmits_what_a_batch_left_out(
    raw_data, scenes, reference, qwen_tokenizer_dir, tmp_path
):
    with LocalLLMServer(scenes, batch_drop_every=4) as server:
        code = run_build([raw_data / "videorefer-qa.json"], tmp_path, "qa", server.base_url, qwen_tokenizer_dir,
                         "--backend", "batch", "--batch-poll-s", "0.05", "--batch-max-lines", "5")  # fmt: skip
    assert code == 0
    name = "refined-format-videorefer-qa.json"
    reference_records = [
        {k: v for k, v in r.items() if k != "meta"} for r in json.loads((reference["qa"] / name).read_text())
    ]
    records = [{k: v for k, v in r.items() if k != "meta"} for r in json.loads((tmp_path / name).read_text())]
    assert records == reference_records
    batches = [json.loads(line) for line in (tmp_path / "batches.jsonl").read_text().splitlines()]
    submitted = [b for b in batches if "batch_id" in b]
    assert (
        len(submitted) >= 4 and max(b["lines"] for b in submitted) <= 5
    )  # 14 requests in files of 5, then the rest


def test_vllm_backend_with_a_stand_in_module(
    raw_data, scenes, reference, qwen_tokenizer_dir, tmp_path, monkeypatch
):
    calls = Counter()

    class FakeLLM:
        def __init__(self, model, **kwargs):
            calls["init"] += 1

        def chat(self, conversations, sampling_params, use_tqdm=False):
            calls["chat"] += 1
            assert all(p.kwargs["structured_outputs"].kwargs["json"]["required"] for p in sampling_params)
            outs = []
            for messages in conversations:
                text = scenes({"model": "local", "messages": messages}).content
                gen = types.SimpleNamespace(text=text, finish_reason="stop", token_ids=[0] * 10)
                outs.append(types.SimpleNamespace(outputs=[gen], prompt_token_ids=[0] * 100))
            return outs

    class Params:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=Params,
                                 sampling_params=types.SimpleNamespace(StructuredOutputsParams=Params))  # fmt: skip
    monkeypatch.setitem(sys.modules, "vllm", fake)
    assert (
        run_build(
            [raw_data / "videorefer-qa.json"], tmp_path, "qa", None, qwen_tokenizer_dir, "--backend", "vllm"
        )
        == 0
    )
    name = "refined-format-videorefer-qa.json"
    assert (tmp_path / name).read_bytes() == (reference["qa"] / name).read_bytes()
    assert calls == Counter(init=1, chat=1)


def test_budget_dry_run_and_reparse_send_only_what_they_should(
    raw_data, scenes, qwen_tokenizer_dir, tmp_path, capsys
):
    qa = raw_data / "videorefer-qa.json"
    assert (
        run_build(
            [qa], tmp_path, "qa", None, qwen_tokenizer_dir, "--dry-run", "--price-in", "1", "--price-out", "2"
        )
        == 0
    )
    printed = capsys.readouterr().out
    estimate = json.loads(printed[printed.index("{") :])
    assert estimate["requests"] == 14 and estimate["estimated_prompt_tokens"] > 14 * 500
    assert estimate["estimated_cost_usd"] > 0 and not (tmp_path / "responses.jsonl").stat().st_size
    with LocalLLMServer(scenes) as server:
        code = run_build([qa], tmp_path, "qa", server.base_url, qwen_tokenizer_dir, "--budget-usd", "1e-9",
                         "--price-in", "1", "--price-out", "1", "--concurrency", "1")  # fmt: skip
        assert code == 3 and server.received == 1
        stats = json.loads((tmp_path / "stats.json").read_text())
        assert (
            stats["stop_reason"] == "budget"
            and stats["rejected"]["not_sent"] == 13
            and stats["accepted"] == 1
        )
        assert run_build([qa], tmp_path, "qa", server.base_url, qwen_tokenizer_dir) == 0
        assert server.received == 14
        code = run_build(
            [qa], tmp_path, "qa", None, qwen_tokenizer_dir, "--reparse", "--max-expression-words", "1"
        )
        assert code == 0 and server.received == 14
    stats = json.loads((tmp_path / "stats.json").read_text())  # every reply now fails; retries not sent
    assert stats["accepted"] == 0 and stats["rejected"]["not_sent"] == 14
    assert stats["reasons"]["first_reply"]["expression_too_long"] == 14
    assert run_build([qa], tmp_path, "qa", None, qwen_tokenizer_dir, "--reparse") == 0
    assert json.loads((tmp_path / "stats.json").read_text())["accepted"] == 14
    assert os.path.getsize(tmp_path / "rejected.jsonl") == 0


def test_input_checks_are_reused_by_later_passes_and_runs(raw_data, tmp_path, monkeypatch):
    from swim.data.nl_refer import raw
    from swim.data.video import probe_video

    checks, probes = Counter(), Counter()
    real_check = raw.check_raw
    monkeypatch.setattr(
        raw, "check_raw", lambda record, **kw: checks.update([record.position]) or real_check(record, **kw)
    )
    path = tmp_path / "qa.json"
    path.write_bytes(
        (raw_data / "videorefer-qa.json").read_bytes().replace(b'"videos/', f'"{raw_data}/videos/'.encode())
    )

    def one_pass(memo):
        probe = lambda p: probes.update([p]) or probe_video(p)  # noqa: E731
        return [
            (type(r).__name__, getattr(r, "video_info", None))
            for r in raw.iter_raw([path], "qa", memo=memo, probe=probe)
        ]

    memo = raw.CheckMemo(tmp_path / "checks.jsonl")
    first = one_pass(memo)
    assert (
        one_pass(memo) == first and {kind for kind, _ in first} == {"RawRecord"} and all(v for _, v in first)
    )
    memo.close()
    assert one_pass(raw.CheckMemo(tmp_path / "checks.jsonl")) == first  # the next run
    assert set(checks.values()) == {1} and set(probes.values()) == {1}
    os.utime(path, ns=(0, 0))  # the input changed: checked again
    assert one_pass(raw.CheckMemo(tmp_path / "checks.jsonl")) == first and set(checks.values()) == {2}


def test_a_repeated_video_and_question_is_kept_once(raw_data, scenes, qwen_tokenizer_dir, tmp_path):
    records = json.loads((raw_data / "videorefer-qa.json").read_text())[:3]
    path = raw_data / "dup-qa.json"
    path.write_text(json.dumps([*records, records[1]]))
    with LocalLLMServer(scenes) as server:
        assert run_build([path], tmp_path, "qa", server.base_url, qwen_tokenizer_dir) == 0
    bad = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert [(r["position"], r["codes"]) for r in bad] == [(3, ["duplicate"])]
    assert len(json.loads((tmp_path / "refined-format-dup-qa.json").read_text())) == 3


def test_content_checks_in_worker_processes_give_the_same_stream(raw_data, tmp_path):
    from swim.data.nl_refer.raw import CheckMemo, iter_raw

    records = json.loads((raw_data / "videorefer-qa.json").read_text())[:6]
    records[2]["annotation"][0][next(iter(records[2]["annotation"][0]))]["segmentation"]["counts"] = "%%%"
    records[4]["video"] = "videos/missing.mp4"
    path = raw_data / "mixed-qa.json"
    path.write_text(json.dumps(records))
    one = list(iter_raw([path], "qa"))
    two = list(iter_raw([path], "qa", workers=2, memo=CheckMemo(tmp_path / "checks.jsonl")))
    assert one == two and [type(r).__name__ for r in two].count("InputProblem") == 2
    again = list(
        iter_raw([path], "qa", workers=2, memo=CheckMemo(tmp_path / "checks.jsonl"))
    )  # all from the memo
    assert again == one
