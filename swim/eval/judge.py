"""The VideoRefer-Bench-D judge: an OpenAI-compatible chat model scores a description against the reference.

- Four dimensions, integers 0-5 (Subject Correspondence, Appearance Description, Temporal Description,
  Hallucination Detection); the item's scores are parsed from lines like ``1. Subject Correspondence: 5``.
  The system prompt below paraphrases VideoRefer's ``system.txt`` (docs/official_release.md §5.2); the user
  message has VideoRefer's ``##Correct answer: …`` / ``##Predicted answer: …`` layout.
- Every reply is cached on disk as it arrives (append-only JSONL, fsync'd), keyed by a hash of the judge
  model, the sampling settings and the full prompt, so an interrupted run resumes without paying twice.
  Replies are parsed when read, so a parser fix re-scores the cache without new calls.
- Transient API errors (connection, timeout, 429, 5xx) are retried with bounded exponential backoff; an
  authentication / permission / not-found error stops the run (`JudgeFatalError`); any other error fails
  that item only (not cached, so a rerun tries it again).
- The API key comes from ``--judge-api-key`` or ``OPENAI_API_KEY`` and is never logged or written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swim.data.nl_refer.llm import is_transient
from swim.eval.sharding import JsonlStore

logger = logging.getLogger(__name__)

DEFAULT_JUDGE_MODEL = "gpt-4o-2024-11-20"

DIMENSIONS = (
    "Subject Correspondence",
    "Appearance Description",
    "Temporal Description",
    "Hallucination Detection",
)

JUDGE_SYSTEM_PROMPT = "\n".join(
    [
        (
            "You are an expert evaluator of object-centric video descriptions. You will receive a reference "
            "description of one specific object in a video (the correct answer) and a description of the same"
            " object written by a model (the predicted answer). Judge how factually accurate the predicted "
            "answer is, using the correct answer as the ground truth, along four dimensions:"
        ),
        "",
        (
            "1. Subject Correspondence: does the predicted answer describe the same subject as the correct "
            "answer (the same object, person or animal, of the same kind)?"
        ),
        (
            "2. Appearance Description: how accurately does it describe the subject's visual attributes, such"
            " as colour, shape, size, texture and clothing?"
        ),
        (
            "3. Temporal Description: how accurately does it describe what the subject does over time, i.e. "
            "its actions, movements and their order?"
        ),
        (
            "4. Hallucination Detection: is it free of content that the correct answer does not support, such"
            " as invented objects, attributes or actions, or wrong inferences? A higher score means fewer "
            "hallucinations."
        ),
        "",
        (
            "Score each dimension with an integer from 0 to 5: 5 means it fully agrees with the correct "
            "answer, 0 means it is entirely wrong or unrelated. Follow each score with a one-sentence "
            "explanation. Reply exactly in this format:"
        ),
        "1. Subject Correspondence: <score>",
        "Explanation: <one sentence>",
        "2. Appearance Description: <score>",
        "Explanation: <one sentence>",
        "3. Temporal Description: <score>",
        "Explanation: <one sentence>",
        "4. Hallucination Detection: <score>",
        "Explanation: <one sentence>",
    ]
)

# "1. Subject Correspondence: 5", tolerating markdown emphasis and "1)" numbering.
_SCORE_LINE = re.compile(
    r"^[\s#>*-]*\d+\s*[.)]\s*[*_]*\s*([A-Za-z][A-Za-z ]*?)\s*[*_]*\s*[:：]\s*[*_]*\s*(\d+(?:\.\d+)?)",
    re.MULTILINE,
)


class JudgeFatalError(RuntimeError):
    """The judge cannot work at all (bad key, no permission, unknown model or URL): stop the run."""


def build_user_prompt(reference: str, prediction: str) -> str:
    return f"##Correct answer: {reference}\n##Predicted answer: {prediction}\n"


def parse_scores(reply: str | None) -> tuple[dict[str, float] | None, str | None]:
    """The four dimension scores of a judge reply, or ``(None, reason)``.

    Every dimension must appear (first occurrence wins) with a value in [0, 5]; anything else is a failure.
    """
    if not reply or not reply.strip():
        return None, "empty reply"
    names = {d.lower(): d for d in DIMENSIONS}
    scores: dict[str, float] = {}
    for m in _SCORE_LINE.finditer(reply):
        name = names.get(" ".join(m.group(1).split()).lower())
        if name is not None and name not in scores:
            scores[name] = float(m.group(2))
    missing = [d for d in DIMENSIONS if d not in scores]
    if missing:
        return None, f"missing score(s) for {', '.join(missing)}"
    bad = {d: v for d, v in scores.items() if not 0 <= v <= 5}
    if bad:
        return None, f"score(s) outside 0-5: {bad}"
    return {d: scores[d] for d in DIMENSIONS}, None


# ---------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class JudgeConfig:
    model: str = DEFAULT_JUDGE_MODEL
    base_url: str | None = None  # None: OPENAI_BASE_URL, else the OpenAI default
    api_key: str | None = field(default=None, repr=False)  # never logged
    temperature: float = 0.0
    max_tokens: int = 1024
    timeout_s: float = 60.0
    max_retries: int = 6  # retries after the first attempt, transient errors only
    backoff_s: float = 2.0  # first retry delay; doubles each retry
    backoff_max_s: float = 60.0
    system_prompt: str = JUDGE_SYSTEM_PROMPT

    def public(self) -> dict[str, Any]:
        """What may go into logs and results files (no key)."""
        return {
            "model": self.model,
            "base_url": self.base_url or "(OpenAI default)",
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "system_prompt_sha256": hashlib.sha256(self.system_prompt.encode()).hexdigest()[:16],
        }


def add_judge_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("judge (OpenAI-compatible chat completions)")
    g.add_argument(
        "--judge-model", default=DEFAULT_JUDGE_MODEL, help="pin a dated snapshot for comparability"
    )
    g.add_argument("--judge-base-url", default=None, help="default: $OPENAI_BASE_URL, else api.openai.com")
    g.add_argument(
        "--judge-api-key",
        default=None,
        help="default: $OPENAI_API_KEY (prefer the variable: flags show up in process lists); any non-empty "
        "string for servers without auth",
    )
    g.add_argument("--judge-temperature", type=float, default=0.0)
    g.add_argument("--judge-max-tokens", type=int, default=1024)
    g.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument("--judge-max-retries", type=int, default=6, help="retries of transient errors per item")
    g.add_argument("--judge-backoff", type=float, default=2.0, help="first retry delay (doubles each retry)")
    g.add_argument("--judge-backoff-max", type=float, default=60.0, help="longest retry delay")
    g.add_argument("--judge-workers", type=int, default=4, help="concurrent judge requests")
    g.add_argument("--judge-cache", default=None, help="reply cache JSONL (default: OUT/judge_cache.jsonl)")
    g.add_argument("--judge-system-prompt-file", default=None, help="replace the built-in system prompt")


def judge_config_from_args(args: argparse.Namespace) -> JudgeConfig:
    system = JUDGE_SYSTEM_PROMPT
    if args.judge_system_prompt_file:
        system = Path(args.judge_system_prompt_file).read_text(encoding="utf-8").strip()
    return JudgeConfig(
        model=args.judge_model,
        base_url=args.judge_base_url or os.environ.get("OPENAI_BASE_URL") or None,
        api_key=args.judge_api_key or os.environ.get("OPENAI_API_KEY") or None,
        temperature=args.judge_temperature,
        max_tokens=args.judge_max_tokens,
        timeout_s=args.judge_timeout,
        max_retries=max(0, args.judge_max_retries),
        backoff_s=max(0.0, args.judge_backoff),
        backoff_max_s=max(0.0, args.judge_backoff_max),
        system_prompt=system,
    )


# ---------------------------------------------------------------------------------------------------------
# Cached, retrying judge


@dataclass
class JudgeResult:
    """One judged item: `scores` when parsed, else `error` says why (API failure or unparsable reply)."""

    cache_key: str
    scores: dict[str, float] | None = None
    reply: str | None = None
    error: str | None = None
    cached: bool = False  # the reply came from the cache (no call made now)

    @property
    def ok(self) -> bool:
        return self.scores is not None


def cache_key(config: JudgeConfig, user_prompt: str) -> str:
    """Hash of everything that determines the reply: judge model, sampling settings and both prompts."""
    blob = json.dumps(
        [config.model, config.temperature, config.max_tokens, config.system_prompt, user_prompt],
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class Judge:
    """Scores (reference, prediction) pairs through an OpenAI-compatible endpoint, with an on-disk cache.

    Thread-safe: `score` may be called from several threads (cache appends are serialised).
    `client` is created lazily, so a fully cached run needs no key and no network.
    """

    def __init__(
        self,
        config: JudgeConfig,
        cache_path: str | Path,
        *,
        client: Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.config = config
        self.cache = JsonlStore(cache_path, key_field="key")
        self._client = client
        self._sleep = sleep
        self._lock = threading.Lock()
        self.calls_made = 0  # successful API calls in this process
        self.requests_sent = 0  # attempts, retries included

    def close(self) -> None:
        self.cache.close()

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self):
        import openai

        if not self.config.api_key:
            raise JudgeFatalError(
                "no judge API key: set OPENAI_API_KEY or pass --judge-api-key (any non-empty string for a "
                "local server without authentication)"
            )
        logger.info("judge: %s at %s", self.config.model, self.config.base_url or "the OpenAI default URL")
        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        return openai.OpenAI(
            api_key=self.config.api_key,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,  # retries are ours, so they are bounded and logged
        )

    def score(self, reference: str, prediction: str) -> JudgeResult:
        user = build_user_prompt(reference, prediction)
        key = cache_key(self.config, user)
        hit = self.cache.get(key)
        if hit is not None:
            return self._result(key, hit.get("reply"), cached=True)
        try:
            reply, meta = self._request(user)
        except JudgeFatalError:
            raise
        except Exception as e:  # one item's failure; not cached, so a rerun retries it
            return JudgeResult(key, error=f"request failed: {type(e).__name__}: {e}")
        record = {"key": key, "model": self.config.model, "reply": reply, "user_prompt": user, **meta}
        with self._lock:
            self.cache.append(record)
            self.calls_made += 1
        return self._result(key, reply, cached=False)

    @staticmethod
    def _result(key: str, reply: str | None, *, cached: bool) -> JudgeResult:
        scores, reason = parse_scores(reply)
        return JudgeResult(key, scores, reply, None if scores else f"unparsable reply: {reason}", cached)

    def _request(self, user_prompt: str) -> tuple[str, dict[str, Any]]:
        """One chat completion, retrying transient errors with exponential backoff."""
        import openai

        messages = [
            {"role": "system", "content": self.config.system_prompt},
            {"role": "user", "content": user_prompt},
        ]
        attempt = 0
        while True:
            try:
                with self._lock:
                    self.requests_sent += 1
                response = self.client.chat.completions.create(
                    model=self.config.model,
                    messages=messages,
                    temperature=self.config.temperature,
                    max_tokens=self.config.max_tokens,
                )
                choice = response.choices[0]
                meta = {
                    "response_model": getattr(response, "model", None),
                    "finish_reason": getattr(choice, "finish_reason", None),
                }
                # A filtered reply has no content: cache it as "" (it is paid for) and count it as failed.
                return choice.message.content or "", meta
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise JudgeFatalError(
                    f"judge request rejected ({type(e).__name__}, HTTP {e.status_code})"
                ) from e
            except Exception as e:
                if not is_transient(e) or attempt >= self.config.max_retries:
                    raise
                delay = min(self.config.backoff_max_s, self.config.backoff_s * 2**attempt)
                attempt += 1
                logger.warning(
                    "judge request failed (%s); retry %d/%d in %.1f s",
                    type(e).__name__, attempt, self.config.max_retries, delay,
                )  # fmt: skip
                self._sleep(delay)
