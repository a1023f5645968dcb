"""VideoRefer-Bench-D end to end against a local judge: a run killed mid-judging resumes without repeating a
paid call, and every item that cannot be scored is counted and listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_eval import (
    CPU_FLAGS,
    SMALL_VIDEO_FLAGS,
    JudgeServer,
    append_records,
    judge_reply,
    synth_benches,
    talkative_checkpoint,
)

from swim.eval import bench_d
from swim.eval.judge import DIMENSIONS, parse_scores

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-local-test-key"


@pytest.fixture(scope="module")
def model_dir(tiny_ckpt, tmp_path_factory):
    return talkative_checkpoint(tiny_ckpt, tmp_path_factory.getbasetemp() / "tiny-talkative")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """3 synthetic items, one whose judge reply cannot be parsed, one whose video is missing (index 4)."""
    root = tmp_path_factory.mktemp("benchd")
    path = synth_benches(root, n_q=0, n_d=3)["bench_d"]
    first = json.loads(path.read_text())[0]
    unparsable = first | {
        "id": 10,
        "conversations": [
            first["conversations"][0],
            {"from": "gpt", "value": "UNPARSABLE <ins>reference</ins>"},
        ],
    }
    append_records(path, [unparsable, first | {"id": 11, "video": "videos/missing.mp4"}])
    return path


@pytest.fixture
def judge_env(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    server = JudgeServer(max_requests=50)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    yield server
    server.close()


def _args(model_dir, bench, out, *extra):
    return ["--model", str(model_dir), "--bench", str(bench), "--out", str(out), "--max-new-tokens", "6",
            "--judge-model", "judge-test", "--judge-backoff", "0", *SMALL_VIDEO_FLAGS, *CPU_FLAGS,
            *extra]  # fmt: skip


def _check_results(results: dict, out: Path) -> None:
    assert results["n_items"] == 5 and results["n_scored"] == 3 and results["n_failed"] == 2
    assert results["failed_by_stage"] == {"generation": 1, "judge_request": 0, "judge_parse": 1}
    failed = {f["key"]: f["reason"] for f in results["failed"]}
    assert failed["3"].startswith("unparsable reply") and "VideoDecodeError" in failed["4"]
    rows = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["0", "1", "2", "3", "4"]
    expected = [parse_scores(judge_reply(r["reference"], r["prediction"] or ""))[0] for r in rows[:3]]
    assert [r["scores"] for r in rows[:3]] == expected
    dims = {d: sum(e[d] for e in expected) / 3 for d in DIMENSIONS}
    assert results["dimensions"] == pytest.approx(dims)
    assert results["score"] == pytest.approx(sum(dims.values()) / 4)
    assert results["score_failures_as_zero"] == pytest.approx(sum(dims.values()) / 4 * 3 / 5)
    assert rows[0]["reference"] == rows[0]["reference"].replace("<ins>", "")
    assert "<ins>" not in rows[0]["question"]
    written = [
        out / "results.json",
        out / "scored.jsonl",
        out / "judge_cache.jsonl",
        *out.glob("generations*"),
    ]
    assert all(SECRET not in path.read_text() for path in written)


def test_killed_run_resumes_without_repeating_judge_calls(model_dir, bench, tmp_path, judge_env, monkeypatch):
    server = judge_env
    server.hang_at = 3  # the 3rd judge request never gets an answer: the process is killed while waiting
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "swim.eval.bench_d",
        *_args(model_dir, bench, tmp_path, "--judge-workers", "1"),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not server.hanging.wait(0.2):
            if proc.poll() is not None:
                pytest.fail(
                    f"bench-d exited early ({proc.returncode}):\n{proc.stderr.read().decode()[-3000:]}"
                )
    finally:
        proc.kill()  # SIGKILL: no cleanup, no atexit, like a crash or a lost node
        proc.communicate(timeout=30)
        server.release.set()
    assert len(server.answered) == 2 and not (tmp_path / "results.json").exists()
    server.hang_at = None

    retried: list[list[str]] = []
    original_run = bench_d.Generator.run

    def spy(self, items, on_output, **kw):
        retried.append([it.key for it in items])
        return original_run(self, items, on_output, **kw)

    monkeypatch.setattr(bench_d.Generator, "run", spy)
    results = bench_d.run(_args(model_dir, bench, tmp_path))

    assert retried == [["4"]]  # answers were not regenerated; only the failed video is tried again
    assert len(server.answered) == 4 == len(set(server.answered))  # every judgeable item judged exactly once
    assert server.over_limit == 0
    assert results["judge_calls"]["made_now"] == 2
    _check_results(results, tmp_path)

    again = bench_d.run(["--merge", "--out", str(tmp_path), "--judge-model", "judge-test"])  # all cached
    assert len(server.answered) == 4 and again["judge_calls"]["made_now"] == 0
    assert {k: again[k] for k in ("dimensions", "score", "n_failed")} == {
        k: results[k] for k in ("dimensions", "score", "n_failed")
    }


def test_sharded_generation_then_merge(model_dir, bench, tmp_path, judge_env):
    for i in range(2):
        args = _args(
            model_dir, bench, tmp_path, "--num-shards", "2", "--shard-index", str(i), "--batch-size", "2"
        )
        assert bench_d.run(args) is None
    assert judge_env.requests == 0  # shards only generate
    results = bench_d.run(["--merge", "--out", str(tmp_path), "--judge-model", "judge-test"])
    assert len(judge_env.answered) == 4
    _check_results(results, tmp_path)


def test_missing_key_stops_before_any_call(model_dir, bench, tmp_path, judge_env, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        bench_d.run(_args(model_dir, bench, tmp_path, "--limit", "1"))
    assert judge_env.requests == 0
    assert (tmp_path / "generations.jsonl").exists()  # the answers are kept for the rerun
