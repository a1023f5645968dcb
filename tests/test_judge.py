"""The Bench-D judge: reply parsing, retries, fatal errors and the on-disk reply cache (local HTTP server)."""

from __future__ import annotations

import json

import pytest
from fixtures_eval import JudgeServer, judge_reply

from swim.eval.judge import DIMENSIONS, Judge, JudgeConfig, JudgeFatalError, cache_key, parse_scores

CANONICAL = (
    "1. Subject Correspondence: 5\nExplanation: same dog.\n"
    "2. Appearance Description: 4\nExplanation: colour right.\n"
    "3. Temporal Description: 3\nExplanation: misses the jump.\n"
    "4. Hallucination Detection: 2\nExplanation: invents a ball.\n"
)


@pytest.fixture
def server(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s = JudgeServer()
    yield s
    s.close()


def _config(server: JudgeServer, **kw) -> JudgeConfig:
    settings = {"backoff_s": 0.0, "timeout_s": 10.0, **kw}
    return JudgeConfig(model="judge-test", base_url=server.url, api_key="sk-test-secret", **settings)


def test_parse_canonical():
    scores, reason = parse_scores(CANONICAL)
    assert reason is None
    assert scores == dict(zip(DIMENSIONS, [5.0, 4.0, 3.0, 2.0]))


@pytest.mark.parametrize(
    "reply",
    [
        "**1. Subject Correspondence:** 5\n**2. Appearance Description:** 4\n"
        "**3. Temporal Description:** 3\n**4. Hallucination Detection:** 2",
        "1) Subject Correspondence: 5\n2) Appearance Description: 4\n3) Temporal Description: 3\n"
        "4) Hallucination Detection: 2",
        "1. **Subject Correspondence**: 5\n2. **Appearance Description**: 4\n3. **Temporal Description**: 3\n"
        "4. **Hallucination Detection**: 2",
        "Here is my evaluation.\n\n" + CANONICAL.replace(": 5", ":5"),
    ],
)
def test_parse_variants(reply):
    scores, _ = parse_scores(reply)
    assert scores == dict(zip(DIMENSIONS, [5.0, 4.0, 3.0, 2.0]))


@pytest.mark.parametrize(
    "reply, why",
    [
        ("", "empty"),
        (None, "empty"),
        ("I cannot evaluate this.", "missing"),
        (CANONICAL.replace("4. Hallucination Detection: 2\n", ""), "Hallucination Detection"),
        (CANONICAL.replace("Temporal Description: 3", "Temporal Description: 7"), "outside 0-5"),
    ],
)
def test_parse_failures_say_why(reply, why):
    scores, reason = parse_scores(reply)
    assert scores is None and why in reason


def test_cache_key_depends_on_model_and_prompt():
    a = JudgeConfig(model="m1")
    assert cache_key(a, "p") == cache_key(JudgeConfig(model="m1"), "p")
    assert cache_key(a, "p") != cache_key(JudgeConfig(model="m2"), "p")
    assert cache_key(a, "p") != cache_key(a, "q")
    assert cache_key(a, "p") != cache_key(JudgeConfig(model="m1", temperature=0.7), "p")


def test_key_is_never_in_repr_logs_or_cache(server, tmp_path, caplog):
    config = _config(server)
    assert "sk-test-secret" not in repr(config) and "sk-test-secret" not in json.dumps(config.public())
    judge = Judge(config, tmp_path / "cache.jsonl")
    with caplog.at_level("DEBUG"):
        assert judge.score("A red dog runs.", "A dog runs.").ok
    judge.close()
    assert "sk-test-secret" not in caplog.text
    assert "sk-test-secret" not in (tmp_path / "cache.jsonl").read_text()


def test_cached_replies_are_not_requested_again(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    pairs = [("A red dog runs.", "A dog runs."), ("A cat sleeps.", "A cat."), ("A car.", "")]
    judge = Judge(_config(server), cache)
    first = [judge.score(r, p) for r, p in pairs]
    judge.close()
    assert server.requests == 3 and judge.calls_made == 3
    assert all(r.ok and not r.cached for r in first)
    assert first[0].scores == parse_scores(judge_reply(*pairs[0]))[0]

    again = Judge(_config(server), cache)  # a new process, same cache file
    second = [again.score(r, p) for r, p in pairs]
    again.close()
    assert server.requests == 3 and again.calls_made == 0
    assert all(r.cached for r in second)
    assert [r.scores for r in second] == [r.scores for r in first]


def test_fully_cached_run_needs_no_key(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    judge = Judge(_config(server), cache)
    judge.score("ref", "pred")
    judge.close()
    keyless = JudgeConfig(model="judge-test", base_url=server.url, api_key=None)
    assert Judge(keyless, cache).score("ref", "pred").cached
    with pytest.raises(JudgeFatalError, match="OPENAI_API_KEY"):
        Judge(keyless, cache).score("ref", "another prediction")


def test_truncated_cache_line_is_ignored_and_repaired(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    judge = Judge(_config(server), cache)
    judge.score("ref one", "pred")
    judge.close()
    with cache.open("a") as f:
        f.write('{"key": "abc", "reply": "1. Subj')  # a crash in the middle of a write
    judge = Judge(_config(server), cache)
    assert judge.score("ref one", "pred").cached
    assert judge.score("ref two", "pred").ok
    judge.close()
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["user_prompt"].startswith("##Correct answer: ref two")


def test_transient_errors_are_retried_with_backoff(server, tmp_path):
    server.fail_next, server.fail_status = 2, 500
    sleeps: list[float] = []
    judge = Judge(_config(server, backoff_s=0.5, max_retries=3), tmp_path / "c.jsonl", sleep=sleeps.append)
    result = judge.score("ref", "pred")
    judge.close()
    assert result.ok and judge.requests_sent == 3 and judge.calls_made == 1
    assert sleeps == [0.5, 1.0]  # exponential


def test_rate_limit_retries_are_bounded(server, tmp_path):
    server.fail_next, server.fail_status = 10, 429
    judge = Judge(_config(server, max_retries=2), tmp_path / "c.jsonl", sleep=lambda s: None)
    result = judge.score("ref", "pred")
    judge.close()
    assert not result.ok and "request failed" in result.error and "RateLimitError" in result.error
    assert judge.requests_sent == 3 and server.requests == 3
    assert not (tmp_path / "c.jsonl").exists() or "ref" not in (tmp_path / "c.jsonl").read_text()


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_stop_the_run(server, tmp_path, status):
    server.fail_next, server.fail_status = 1, status
    judge = Judge(_config(server), tmp_path / "c.jsonl", sleep=lambda s: None)
    with pytest.raises(JudgeFatalError, match=str(status)):
        judge.score("ref", "pred")
    assert server.requests == 1  # not retried


def test_unparsable_reply_is_cached_and_counted_failed(server, tmp_path):
    judge = Judge(_config(server), tmp_path / "c.jsonl")
    result = judge.score("UNPARSABLE reference", "pred")
    assert not result.ok and result.error.startswith("unparsable reply")
    assert result.reply == "I am unable to rate this description."
    assert judge.score("UNPARSABLE reference", "pred").cached  # paid for once, never again
    judge.close()
    assert server.requests == 1
