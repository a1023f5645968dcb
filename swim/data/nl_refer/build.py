"""``swim data build``: raw VideoRefer-700K / VideoRefer-Bench records -> NL-Refer, through an LLM.

    swim data build videorefer-qa-75k.json --out nl_refer/ --kind qa \\
        --llm https://api.openai.com/v1 --model gpt-4o-2024-11-20 [--concurrency 32] [--budget-usd 50]
    swim data build ... --dry-run        # request count, estimated tokens and cost; sends nothing
    swim data build ... --reparse        # re-validate the logged replies (after a validator change); sends nothing

Stages, per record: *read* (streamed; `swim.data.nl_refer.raw` checks the placeholders, masks and video; a bad
record is reported by position with its reason codes and never sent), *rewrite* (one chat request,
`swim.data.nl_refer.prompt`), *validate* (`swim.data.nl_refer.checks`; a rejected reply is retried once with
the reasons, then the record is rejected), *write* (the output record: the deterministic *format* of the raw
record, with the rewritten text).

Exactly once and resumable. Every reply is appended to ``OUT/responses.jsonl`` as it arrives (flushed and
fsync'd), keyed by its request id: a hash of the record index, the prompt text and version, the model and the
sampling parameters. Whether a record needs a request, and which, is a pure function of the record and that log
(`RecordPlan`), so a run killed at any moment and started again sends only the requests whose replies are not in
the log, and the outputs, written at the end from the log alone, equal an uninterrupted run's. A truncated last
line (a kill mid-write) is cut off on reopening. Failed requests (after the transport retries) are not logged:
a rerun tries them again. ``--reparse`` re-validates from the log without sending anything.

Outputs, rewritten at the end of each run (atomically):
- ``OUT/refined-format-<input stem>.json`` (700K kinds) / ``OUT/refined-<input stem>.json`` (Bench-D/-Q): the
  accepted records, shaped like the released NL-Refer files, with ``objects`` (expression, head noun) and
  ``meta`` (prompt version, model, request id) added;
- ``OUT/rejected.jsonl``: every other input record: its source, position and index, the stage (``input``,
  ``reply``, ``request``, ``not_sent``), the reason codes and, for replies, the raw reply;
- ``OUT/stats.json``: counts per stage and reason, tokens in/out, cost (price table ``prices.yaml`` or
  ``--price-in/--price-out``), latency percentiles, records/s.

Exit status: 0 when every record was decided (accepted or rejected); 3 when the budget stopped the run or some
requests failed after all retries (run the same command again); 130 after Ctrl-C (outputs written first).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swim.data.nl_refer.checks import CheckConfig, Verdict, validate_reply
from swim.data.nl_refer.prompt import (
    REPLY_SCHEMA,
    PromptTemplate,
    RequestParams,
    answer_mode,
    build_messages,
    record_payload,
    request_body,
    request_id,
)

logger = logging.getLogger(__name__)

PRICES_FILE = Path(__file__).with_name("prices.yaml")
KIND_CHOICES = ("detailed", "short", "qa", "bench_d", "bench_q")
EXIT_INCOMPLETE, EXIT_INTERRUPTED = 3, 130


# ----------------------------------------------------------------------------------------------------------
# The response log


class ResponseLog:
    """Append-only JSONL of replies keyed by request id; only byte offsets are kept in memory."""

    def __init__(self, path: Path, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.offsets: dict[str, int] = {}
        self._repair_and_index()
        self._file = self.path.open("ab")
        self._reader = self.path.open("rb")  # one handle for every lookup (the log is only appended to)

    def _repair_and_index(self) -> None:
        if not self.path.exists():
            self.path.touch()
            return
        with self.path.open("rb+") as f:
            offset = 0
            for line in f:
                if not line.endswith(b"\n"):  # a kill mid-write: drop the partial line
                    logger.warning(
                        "%s: cut off a partial last line (%d bytes) left by an interrupted run",
                        self.path,
                        len(line),
                    )
                    f.truncate(offset)
                    break
                try:
                    entry = json.loads(line)
                    self.offsets[entry["request_id"]] = offset
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s: unreadable line at byte %d ignored", self.path, offset)
                offset += len(line)

    def __contains__(self, rid: str) -> bool:
        return rid in self.offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, rid: str) -> dict[str, Any] | None:
        offset = self.offsets.get(rid)
        if offset is None:
            return None
        self._reader.seek(offset)
        return json.loads(self._reader.readline())

    def append(self, entry: dict[str, Any]) -> None:
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write((json.dumps(entry, ensure_ascii=False) + "\n").encode())
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.offsets[entry["request_id"]] = offset

    def close(self) -> None:
        self._file.close()
        self._reader.close()


# ----------------------------------------------------------------------------------------------------------
# Output records


def output_name(kind: str, source: str | Path) -> str:
    stem = Path(source).stem
    return f"refined-{stem}.json" if kind.startswith("bench") else f"refined-format-{stem}.json"


def refined_record(
    base: dict[str, Any], record, rewrite: dict[str, Any], meta: dict[str, Any] | None
) -> dict[str, Any]:
    """The output record: ``base`` (the formatted raw record) with the rewritten text, objects and metadata."""
    out = dict(base)
    question = rewrite["question"].strip()
    if record.kind == "bench_q":
        out["Question"] = question
    elif record.kind == "bench_d":
        out["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": record.answer}]
    else:
        answer = rewrite["answer"] if rewrite["answer"] is not None else record.answer
        turns = list(base.get("conversations") or record.obj["conversations"])
        out["conversations"] = [
            {**turns[0], "value": "<video>\n" + question},
            {**turns[1], "value": answer.strip()},
        ]
    out["objects"] = [
        {"expression": o["expression"], "head_noun": o["head_noun"]} for o in rewrite["objects"]
    ]
    if meta is not None:
        out["meta"] = meta
    return out


def validation_base(record) -> dict[str, Any]:
    """The record as the output reader will see it, without normalising masks (validation reads text only)."""
    return {**record.obj, "video": record.video}


# ----------------------------------------------------------------------------------------------------------
# The plan of one record


@dataclass
class Pending:
    request_id: str
    body: dict[str, Any]
    attempt: int
    verdicts: list[Verdict] = field(default_factory=list)  # of the earlier attempts


@dataclass
class Decided:
    accepted: bool
    verdicts: list[Verdict]
    request_ids: list[str]
    rewrite: dict[str, Any] | None = None


@dataclass
class BuildContext:
    template: PromptTemplate
    params: RequestParams
    tokenizer: Any
    log: ResponseLog
    check: CheckConfig = field(default_factory=CheckConfig)
    max_attempts: int = 2
    fixed_tokens: dict[str, int] = field(default_factory=dict)  # token counts of the prompt's fixed texts

    def meta(self, rid: str, attempt: int) -> dict[str, Any]:
        return {
            "prompt": self.template.name,
            "prompt_version": self.template.version,
            "model": self.params.model,
            "request_id": rid,
            "attempts": attempt + 1,
        }


def plan_record(record, ctx: BuildContext) -> Pending | Decided:
    """What this record needs next, from the log alone: a request to send, or its final outcome."""
    payload = record_payload(record)
    previous: tuple[str, list[str]] | None = None
    verdicts: list[Verdict] = []
    rids: list[str] = []
    for attempt in range(ctx.max_attempts):
        body = request_body(ctx.params, build_messages(ctx.template, payload, previous))
        rid = request_id(record.index, body)
        entry = ctx.log.get(rid)
        if entry is None:
            return Pending(rid, body, attempt, verdicts)
        rids.append(rid)
        verdict = validate_reply(
            record,
            entry,
            tokenizer=ctx.tokenizer,
            make_output=lambda r, rw: refined_record(validation_base(r), r, rw, None),
            config=ctx.check,
        )
        verdicts.append(verdict)
        if verdict.ok:
            return Decided(True, verdicts, rids, verdict.rewrite)
        reply_text = entry.get("content") or entry.get("refusal") or "(no content)"
        previous = (reply_text, verdict.feedback())
    return Decided(False, verdicts, rids)


def entry_usage(log: ResponseLog, rids: list[str]) -> list[dict[str, Any]]:
    return [e for e in (log.get(r) for r in rids) if e is not None]


# ----------------------------------------------------------------------------------------------------------
# Prices


@dataclass(frozen=True)
class Prices:
    input_per_m: float  # USD per 1M prompt tokens
    output_per_m: float
    batch_discount: float = 0.5
    known: bool = True

    def cost(self, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float:
        usd = (prompt_tokens * self.input_per_m + completion_tokens * self.output_per_m) / 1e6
        return usd * (self.batch_discount if batch else 1.0)


def load_prices(model: str, path: Path | None, price_in: float | None, price_out: float | None) -> Prices:
    """Prices for ``model`` from the table (longest matching model-name prefix), overridden by the flags."""
    table = yaml.safe_load((path or PRICES_FILE).read_text()) or {}
    models = table.get("models", {})
    match = max((m for m in models if model.startswith(m)), key=len, default=None)
    entry = models.get(match, {}) if match else {}
    known = match is not None or (price_in is not None and price_out is not None)
    if not known:
        logger.warning(
            "no price for model %r in %s: costs are reported as 0 (pass --price-in/--price-out)",
            model,
            path or PRICES_FILE,
        )
    return Prices(
        input_per_m=price_in if price_in is not None else float(entry.get("input", 0.0)),
        output_per_m=price_out if price_out is not None else float(entry.get("output", 0.0)),
        batch_discount=float(table.get("batch_discount", 0.5)),
        known=known,
    )


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_records(args) -> Iterator[Any]:
    """Every input record of every IN file, as `RawRecord` or `InputProblem` (streamed)."""
    from swim.data.nl_refer.raw import CheckMemo, iter_raw

    if not hasattr(args, "check_memo"):  # checked once, whatever the number of passes and runs
        args.check_memo = CheckMemo(args.out / "input_checks.jsonl")
    yield from iter_raw(
        [str(p) for p in args.inputs],
        args.kind,
        video_root=args.video_root,
        check_videos=not args.skip_video_check,
        max_objects=args.max_objects,
        memo=args.check_memo,
        workers=args.check_workers,
    )


def is_problem(item) -> bool:
    from swim.data.nl_refer.raw import InputProblem

    return isinstance(item, InputProblem)


# ----------------------------------------------------------------------------------------------------------
# Sending


@dataclass
class RunState:
    """Counters of this run (what the progress bar and stats.json report)."""

    prices: Prices
    batch: bool = False
    budget_usd: float | None = None
    sent: int = 0
    spent_usd: float = 0.0
    accepted: int = 0
    rejected: int = 0  # after the retry
    input_problems: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # record index -> error
    transport_retries: int = 0  # 429 / 5xx / timeouts / resets retried by the back-end
    stop_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def add_reply(self, entry: dict[str, Any]) -> None:
        self.sent += 1
        usage = entry.get("usage") or {}
        self.spent_usd += self.prices.cost(
            usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), batch=self.batch
        )
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd and self.stop_reason is None:
            self.stop_reason = "budget"
            logger.warning(
                "budget reached: $%.4f spent of $%.2f; no further requests are sent",
                self.spent_usd,
                self.budget_usd,
            )

    def postfix(self) -> dict[str, Any]:
        return {
            "ok": self.accepted,
            "rej": self.rejected,
            "bad_input": self.input_problems,
            "usd": f"{self.spent_usd:.3f}",
        }


def log_entry(
    rid: str, record, attempt: int, reply: dict[str, Any], ctx: BuildContext, backend: str
) -> dict[str, Any]:
    return {
        "request_id": rid,
        "index": record.index,
        "attempt": attempt,
        "model": ctx.params.model,
        "prompt_version": ctx.template.version,
        "backend": backend,
        "time": time.time(),
        **reply,
    }


def _progress(total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rec", dynamic_ncols=True, mininterval=0.5)


async def send_online(records: Iterator[Any], ctx: BuildContext, backend, state: RunState) -> None:
    """Workers take records one at a time and send what each needs until it is decided.

    The records are read and checked in a thread (decoding masks would otherwise stall the replies in flight),
    at most ``2 * concurrency`` ahead of the workers.
    """
    from swim.data.nl_refer.llm import RequestFailed

    bar = _progress(None, "rewrite")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * backend.concurrency)
    done, stopping = object(), threading.Event()

    def put(item) -> bool:
        while not stopping.is_set():
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            try:
                future.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                future.cancel()
        return False

    def produce() -> None:
        try:
            for item in records:
                if state.stop_reason or not put(item):
                    return
        finally:
            put(done)

    async def worker() -> None:
        while (item := await queue.get()) is not done:
            if state.stop_reason:
                continue  # drain: the producer stops at the next record
            bar.update(1)
            if is_problem(item):
                state.input_problems += 1
                continue
            while True:
                step = plan_record(item, ctx)
                if isinstance(step, Decided):
                    if step.accepted:
                        state.accepted += 1
                    else:
                        state.rejected += 1
                    break
                if state.stop_reason:
                    break
                try:
                    reply = await backend.complete(step.body)
                except RequestFailed as e:
                    state.failed[item.index] = str(e)
                    logger.warning("%s: request failed after retries: %s", item.index, e)
                    break
                ctx.log.append(log_entry(step.request_id, item, step.attempt, reply, ctx, backend.name))
                state.add_reply(reply)
            bar.set_postfix(state.postfix(), refresh=False)
        await queue.put(done)  # for the next worker

    producer = loop.run_in_executor(None, produce)
    try:
        await asyncio.gather(*(worker() for _ in range(backend.concurrency)))
    finally:
        stopping.set()
        await producer
        bar.close()
        await backend.aclose()


def pending_requests(records: Iterator[Any], ctx: BuildContext) -> Iterator[tuple[Any, Pending]]:
    for item in records:
        if not is_problem(item):
            step = plan_record(item, ctx)
            if isinstance(step, Pending):
                yield item, step


def send_batch(args, ctx: BuildContext, backend, state: RunState) -> None:
    """Rounds of batches until no record needs a request (or ``--max-batch-rounds``)."""
    for round_ in range(args.max_batch_rounds + 1):
        ingested = backend.ingested()
        open_ids = backend.open_batches(ingested)
        if open_ids:
            logger.info("waiting for %d batch(es) submitted earlier: %s", len(open_ids), ", ".join(open_ids))
            ingest_batches(backend, backend.wait(open_ids, log_batch_status()), ctx, state)
        if round_ == args.max_batch_rounds:
            break

        def requests() -> Iterator[tuple[str, dict[str, Any]]]:
            committed = state.spent_usd  # the batch's cost is known only afterwards: stop on the estimate
            for item, step in pending_requests(read_records(args), ctx):
                committed += state.prices.cost(*estimate_tokens(ctx, item, step.body), batch=True)
                if state.budget_usd is not None and committed > state.budget_usd:
                    state.stop_reason = "budget"
                    logger.warning(
                        "budget: the estimated cost of further requests passes $%.2f", state.budget_usd
                    )
                    return
                yield step.request_id, step.body

        batch_ids = backend.submit(requests())
        if not batch_ids:
            return
        ingest_batches(backend, backend.wait(batch_ids, log_batch_status()), ctx, state)
    logger.warning(
        "stopped after %d batch rounds; records still without a reply are reported as not_sent",
        args.max_batch_rounds,
    )


def log_batch_status():
    """A callback for `BatchBackend.wait` that logs each batch's status and request counts when they change."""
    seen: dict[str, tuple] = {}

    def on_update(batch_id: str, batch: Any) -> None:
        counts = getattr(batch, "request_counts", None)
        state = (batch.status, getattr(counts, "completed", None), getattr(counts, "failed", None))
        if seen.get(batch_id) != state:
            seen[batch_id] = state
            total = getattr(counts, "total", None)
            logger.info("batch %s: %s, %s/%s done, %s failed", batch_id, state[0], state[1], total, state[2])

    return on_update


def ingest_batches(backend, batches: list[Any], ctx: BuildContext, state: RunState) -> None:
    for batch in batches:
        got = errors = 0
        for rid, reply, error in backend.results(batch):
            if reply is None:
                errors += 1
                logger.debug("batch %s: %s failed: %s", batch.id, rid, error)
                continue
            if rid in ctx.log:
                continue
            ctx.log.append({"request_id": rid, "model": ctx.params.model, "prompt_version": ctx.template.version,
                            "backend": "batch", "batch_id": batch.id, "time": time.time(), **reply})  # fmt: skip
            state.add_reply(reply)
            got += 1
        logger.info("batch %s (%s): %d replies logged, %d errors", batch.id, batch.status, got, errors)
        backend.mark_ingested(batch.id)


def send_vllm(args, ctx: BuildContext, backend, state: RunState, chunk: int = 1024) -> None:
    for _ in range(ctx.max_attempts):
        todo = list(pending_requests(read_records(args), ctx))
        if not todo:
            return
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            for (item, step), reply in zip(part, backend.complete_all([s.body for _, s in part])):
                ctx.log.append(log_entry(step.request_id, item, step.attempt, reply, ctx, "vllm"))
                state.add_reply(reply)


# ----------------------------------------------------------------------------------------------------------
# Writing


class JsonArrayWriter:
    """A JSON array written one record per line, atomically renamed into place on close."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = self.tmp.open("w", encoding="utf-8")
        self.file.write("[")
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(("\n" if self.count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        self.file.write("\n]\n")
        self.file.close()
        os.replace(self.tmp, self.path)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def q(p: float) -> float:
        return round(values[min(len(values) - 1, max(0, math.ceil(p * len(values)) - 1))], 4)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(values[-1], 4)}


def write_outputs(args, ctx: BuildContext, state: RunState, *, reparse: bool) -> dict[str, Any]:
    """Decide every record from the log and write the outputs, rejected.jsonl and stats.json."""
    from swim.data.nl_refer.raw import formatted
    from swim.data.records import RecordError, record_from_json

    out: Path = args.out
    writers: dict[str, JsonArrayWriter] = {}
    for source in args.inputs:
        name = output_name(args.kind, source)
        writers.setdefault(str(source), JsonArrayWriter(out / name))
    rejected_tmp = out / "rejected.jsonl.tmp"
    counts: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {"input": Counter(), "reply": Counter(), "first_reply": Counter()}
    prompt_tokens = completion_tokens = 0
    latencies: list[float] = []
    seen: set[bytes] = set()  # (video, question) digests of the accepted records
    with rejected_tmp.open("w", encoding="utf-8") as rejected:

        def reject(item, stage: str, codes: list[str], **extra: Any) -> None:
            counts["rejected"] += 1
            counts[f"rejected_{stage}"] += 1
            line = {"source": item.source, "position": item.position, "index": item.index, "id": item.id,
                    "stage": stage, "codes": codes, **extra}  # fmt: skip
            rejected.write(json.dumps(line, ensure_ascii=False) + "\n")

        for item in read_records(args):
            counts["records"] += 1
            if is_problem(item):
                reasons["input"].update(item.codes)
                reject(item, "input", list(item.codes), reasons=list(item.reasons))
                continue
            step = plan_record(item, ctx)
            if isinstance(step, Pending):
                if step.verdicts:
                    reasons["first_reply"].update(step.verdicts[0].codes)
                if item.index in state.failed:
                    reject(item, "request", ["request_failed"], error=state.failed[item.index])
                else:
                    reject(
                        item,
                        "not_sent",
                        ["not_sent"],
                        detail="no reply logged yet (--reparse, budget or interrupted)",
                    )
                continue
            entries = entry_usage(ctx.log, step.request_ids)
            for e in entries:
                usage = e.get("usage") or {}
                prompt_tokens += usage.get("prompt_tokens", 0)
                completion_tokens += usage.get("completion_tokens", 0)
                if e.get("latency_s"):
                    latencies.append(e["latency_s"])
            if len(step.verdicts) > 1:
                reasons["first_reply"].update(step.verdicts[0].codes)
            if not step.accepted:
                last = step.verdicts[-1]
                reasons["reply"].update(last.codes)
                reject(item, "reply", last.codes, problems=[f"{c}: {d}" for c, d in last.problems],
                       first_codes=step.verdicts[0].codes, raw=entries[-1].get("content"),
                       request_ids=step.request_ids)  # fmt: skip
                continue
            record = refined_record(
                formatted(item), item, step.rewrite, ctx.meta(step.request_ids[-1], len(step.request_ids) - 1)
            )
            try:
                record_from_json(record, source=item.source, index=item.position)
            except RecordError as e:  # never write a record the readers refuse
                reasons["reply"].update(["record"])
                reject(item, "reply", ["record"], problems=[str(e)])
                continue
            key = hashlib.sha1(f"{record['video']}\0{step.rewrite['question'].strip()}".encode()).digest()
            if (
                args.kind not in ("bench_d", "bench_q") and key in seen
            ):  # one (video, question) per training file
                reasons["reply"].update(["duplicate"])
                reject(
                    item,
                    "reply",
                    ["duplicate"],
                    problems=["duplicate: same video and question as an earlier record"],
                )
                continue
            seen.add(key)
            writers[item.source].write(record)
            counts["accepted"] += 1
            counts["accepted_after_retry"] += len(step.request_ids) > 1
    for w in writers.values():
        w.close()
    os.replace(rejected_tmp, out / "rejected.jsonl")
    elapsed = time.perf_counter() - state.started
    stats = {
        "kind": args.kind,
        "inputs": [str(p) for p in args.inputs],
        "outputs": {str(w.path): w.count for w in writers.values()},
        "model": ctx.params.model,
        "backend": args.backend,
        "prompt": ctx.template.name,
        "prompt_version": ctx.template.version,
        "params": ctx.params.public(),
        "reparse": reparse,
        "records": counts["records"],
        "accepted": counts["accepted"],
        "accepted_after_retry": counts["accepted_after_retry"],
        "rejected": {
            stage: counts[f"rejected_{stage}"] for stage in ("input", "reply", "request", "not_sent")
        },
        "reasons": {stage: dict(sorted(c.items())) for stage, c in reasons.items()},
        "requests": {
            "answered_this_run": state.sent,
            "transport_retries_this_run": state.transport_retries,
            "failed_this_run": len(state.failed),
            "in_log": len(ctx.log),
        },
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens},
        "cost_usd": {
            "records_in_output_and_rejected": round(
                state.prices.cost(prompt_tokens, completion_tokens, batch=args.backend == "batch"), 4
            ),
            "this_run": round(state.spent_usd, 4),
            "prices_per_1m_tokens": {
                "input": state.prices.input_per_m,
                "output": state.prices.output_per_m,
                "known": state.prices.known,
            },
        },
        "latency_s": percentiles(latencies),
        "elapsed_s": round(elapsed, 2),
        "records_per_s": round(counts["records"] / elapsed, 2) if elapsed > 0 else None,
        "stop_reason": state.stop_reason,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


# ----------------------------------------------------------------------------------------------------------
# Dry run


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def estimate_tokens(ctx: BuildContext, record, body: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of one request, counted with the validation tokenizer (an estimate)."""
    fixed = ctx.fixed_tokens
    if not fixed:  # the prompt's own text, counted once
        fixed[ctx.template.system] = n_tokens(ctx.tokenizer, ctx.template.system)
        fixed[ctx.template.user] = n_tokens(ctx.tokenizer, ctx.template.user)
    prompt = 0
    for message in body["messages"]:
        content = message["content"]
        known = next((t for t in fixed if content.startswith(t)), None)
        prompt += 4 + (
            fixed[known] + n_tokens(ctx.tokenizer, content[len(known) :])
            if known
            else n_tokens(ctx.tokenizer, content)
        )
    rewritten = record.question + (record.answer if answer_mode(record.kind) == "rewrite" else "")
    return prompt, n_tokens(ctx.tokenizer, rewritten) + 25 * record.n_objects + 30


def dry_run(args, ctx: BuildContext, prices: Prices) -> dict[str, Any]:
    """Count the requests still to send and estimate their tokens and cost (first attempts only)."""
    counts: Counter[str] = Counter()
    tokens_in = tokens_out = 0
    for item in read_records(args):
        counts["records"] += 1
        if is_problem(item):
            counts["input_problems"] += 1
            continue
        step = plan_record(item, ctx)
        if not isinstance(step, Pending):
            counts["decided_in_log"] += 1
            continue
        counts["requests"] += 1
        n_in, n_out = estimate_tokens(ctx, item, step.body)
        tokens_in += n_in
        tokens_out += n_out
    estimate = {
        **counts,
        "estimated_prompt_tokens": tokens_in,
        "estimated_completion_tokens": tokens_out,
        "estimated_cost_usd": round(prices.cost(tokens_in, tokens_out), 4),
        "estimated_cost_usd_batch": round(prices.cost(tokens_in, tokens_out, batch=True), 4),
        "prices_per_1m_tokens": {
            "input": prices.input_per_m,
            "output": prices.output_per_m,
            "known": prices.known,
        },
        "note": "first attempts only, tokens counted with the validation tokenizer (an estimate of the API's); "
        "each rejected reply costs one more request",
    }
    print(json.dumps(estimate, indent=1))
    return estimate


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swim data build", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("inputs", nargs="+", type=Path, help="raw VideoRefer-700K / VideoRefer-Bench JSON files")
    p.add_argument("--out", type=Path, required=True, help="output folder (also holds the response log)")
    p.add_argument("--kind", required=True, choices=KIND_CHOICES)
    p.add_argument(
        "--video-root", default=None, help="folder of the videos (default: each input file's folder)"
    )
    p.add_argument(
        "--llm",
        default=os.environ.get("OPENAI_BASE_URL"),
        help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1",
    )
    p.add_argument("--model", required=True, help="model name (for --backend vllm: a local path or hub name)")
    p.add_argument("--backend", choices=("openai", "batch", "vllm"), default="openai")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--budget-usd", type=float, default=None, help="stop sending when this run's cost reaches this"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print request count, estimated tokens and cost; send nothing"
    )
    p.add_argument("--reparse", action="store_true", help="re-validate the logged replies; send nothing")
    p.add_argument("--prompt", default="rewrite_v1", help="a packaged prompt name or a prompt file path")
    p.add_argument(
        "--tokenizer",
        default="Qwen/Qwen2.5-VL-7B-Instruct",
        help="the training family's tokenizer (token-level tag check, token estimates)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--response-format", choices=("json_schema", "json_object", "none"), default="json_schema")
    p.add_argument(
        "--max-attempts",
        type=int,
        default=2,
        help="requests per record: the first and its retries with the reasons",
    )
    p.add_argument("--max-objects", type=int, default=5)
    p.add_argument("--max-expression-words", type=int, default=12)
    p.add_argument(
        "--check-workers", type=int, default=1,
        help="processes for the input checks (mask decoding, video probes); more than 1 pays off on real, "
        "high-resolution masks",
    )  # fmt: skip
    p.add_argument(
        "--skip-video-check", action="store_true", help="do not open the videos (frame range, readability)"
    )
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument(
        "--max-retries", type=int, default=6, help="transport retries per request (429, 5xx, timeouts)"
    )
    p.add_argument("--backoff-s", type=float, default=1.0)
    p.add_argument(
        "--prices", type=Path, default=None, help=f"price table (default {PRICES_FILE.name} in the package)"
    )
    p.add_argument(
        "--price-in", type=float, default=None, help="USD per 1M prompt tokens (overrides the table)"
    )
    p.add_argument("--price-out", type=float, default=None, help="USD per 1M completion tokens")
    p.add_argument("--batch-poll-s", type=float, default=30.0)
    p.add_argument("--batch-max-lines", type=int, default=50_000)
    p.add_argument("--max-batch-rounds", type=int, default=4)
    p.add_argument(
        "--no-fsync", action="store_true", help="do not fsync each logged reply (faster, less durable)"
    )
    args = p.parse_args(argv)
    if args.dry_run and args.reparse:
        p.error("--dry-run and --reparse exclude each other")
    if args.backend != "vllm" and not (args.dry_run or args.reparse) and not args.llm:
        p.error("--llm URL is required (or set OPENAI_BASE_URL) for the openai and batch back-ends")
    missing = [str(x) for x in args.inputs if not x.is_file()]
    if missing:
        p.error(f"input file(s) not found: {', '.join(missing)}")
    names = [output_name(args.kind, x) for x in args.inputs]
    if len(set(names)) < len(names):
        p.error(
            f"two inputs would write the same output file ({sorted(n for n in names if names.count(n) > 1)[0]}): rename one"
        )
    return args


def load_tokenizer(name: str):
    """The family's tokenizer without torch (`swim.data.text_tokenizer`: same ids, offsets and chat template)."""
    from swim.data.text_tokenizer import TextTokenizer

    return TextTokenizer.from_pretrained(name)


def make_backend(args):
    from swim.data.nl_refer import llm

    api_key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
    retry = llm.RetryPolicy(max_retries=args.max_retries, backoff_s=args.backoff_s, timeout_s=args.timeout_s)
    if args.backend == "openai":
        return llm.OpenAIBackend(args.llm, api_key, concurrency=args.concurrency, retry=retry)
    if args.backend == "batch":
        return llm.BatchBackend(
            args.llm,
            api_key,
            args.out / "batches.jsonl",
            poll_s=args.batch_poll_s,
            max_lines=args.batch_max_lines,
        )
    return llm.VLLMBackend(args.model, schema=REPLY_SCHEMA)


def run(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    template = PromptTemplate.load(args.prompt)
    params = RequestParams(args.model, args.temperature, args.max_tokens, args.response_format, args.seed)
    prices = load_prices(args.model, args.prices, args.price_in, args.price_out)
    log = ResponseLog(args.out / "responses.jsonl", fsync=not args.no_fsync)
    ctx = BuildContext(
        template,
        params,
        load_tokenizer(args.tokenizer),
        log,
        CheckConfig(args.max_expression_words),
        args.max_attempts,
    )
    logger.info(
        "prompt %s (%s), model %s, %d replies already in %s",
        template.name,
        template.version,
        args.model,
        len(log),
        log.path,
    )
    if args.dry_run:
        dry_run(args, ctx, prices)
        args.check_memo.close()
        return 0
    state = RunState(prices, batch=args.backend == "batch", budget_usd=args.budget_usd)
    interrupted = False
    if not args.reparse:
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):  # finish what is in flight, then write the outputs; twice: stop now
            nonlocal interrupted
            if interrupted:
                raise KeyboardInterrupt
            interrupted = True
            state.stop_reason = "interrupted"
            logger.warning("interrupted: no new requests; writing the outputs from the log")

        signal.signal(signal.SIGINT, on_sigint)
        try:
            backend = make_backend(args)
            if args.backend == "openai":
                asyncio.run(send_online(read_records(args), ctx, backend, state))
            elif args.backend == "batch":
                send_batch(args, ctx, backend, state)
            else:
                send_vllm(args, ctx, backend, state)
            state.transport_retries = getattr(backend, "transport_retries", 0)
        finally:
            signal.signal(signal.SIGINT, previous)
    stats = write_outputs(args, ctx, state, reparse=args.reparse)
    log.close()
    args.check_memo.close()
    logger.info(
        "%d records: %d accepted, %d rejected (input %d, reply %d, request failed %d, not sent %d); $%.4f this run; %s",
        stats["records"], stats["accepted"], sum(stats["rejected"].values()), stats["rejected"]["input"],
        stats["rejected"]["reply"], stats["rejected"]["request"], stats["rejected"]["not_sent"],
        state.spent_usd, args.out / "stats.json",
    )  # fmt: skip
    if interrupted:
        return EXIT_INTERRUPTED
    if not args.reparse and (stats["rejected"]["not_sent"] or stats["rejected"]["request"]):
        return EXIT_INCOMPLETE
    return 0


def main(argv: list[str] | None = None) -> None:
    from swim.data.nl_refer.llm import FatalLLMError

    args = parse_args(argv)
    try:
        code = run(args)
    except FatalLLMError as e:
        logger.error("%s", e)
        code = 2
    if code:
        sys.exit(code)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
