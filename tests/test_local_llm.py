"""The local OpenAI-compatible stand-in (`swim.data.nl_refer.local_llm`), driven by the real ``openai`` client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from swim.data.nl_refer.local_llm import (  # noqa: E402
    CONTENT_FAULTS,
    REFUSAL_TEXT,
    FaultResponder,
    LocalLLMServer,
    Reply,
    SceneResponder,
    body_key,
)
from swim.data.nl_refer.prompt import PromptTemplate, build_messages  # noqa: E402

SCENES = {
    "r1": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "circle"}],
    "r2": [{"colour": "green", "shape": "square"}],
}
PAYLOAD = {
    "id": "r1",
    "kind": "qa",
    "question": "There are 2 objects in the video: <object0><region>, <object1><region>.\n"
    "How does <object0> move compared with <object1>?",
    "answer": "<object0> moves left while <object1> moves up.",
    "answer_mode": "rewrite",
    "objects": [{"object": 0, "placeholder": "<object0>"}, {"object": 1, "placeholder": "<object1>"}],
}
EXPECTED = {
    "objects": [
        {"object": 0, "expression": "the red circle", "head_noun": "circle"},
        {"object": 1, "expression": "the blue disc", "head_noun": "disc"},
    ],
    "question": "There are 2 objects in the video: the red <ins>circle</ins>, the blue <ins>disc</ins>.\n"
    "How does the <ins>circle</ins> move compared with the <ins>disc</ins>?",
    "answer": "The <ins>circle</ins> moves left while the <ins>disc</ins> moves up.",
}
KEEP_PAYLOAD = {
    "id": "r2",
    "kind": "bench_q",
    "question": "Which way does <region> move?\n(A) Up\n(B) Down",
    "answer": "(A) Up",
    "answer_mode": "keep",
    "objects": [{"object": 0, "placeholder": "<region>"}],
    "options": ["(A) Up", "(B) Down"],
}


def body_of(payload: dict, model: str = "local") -> dict:
    return {"model": model, "messages": build_messages(PromptTemplate.load(), payload), "temperature": 0.0}


def client_of(server: LocalLLMServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, **kw)


def test_scene_responder_through_the_openai_client():
    with LocalLLMServer(SceneResponder(SCENES)) as server:
        body = body_of(PAYLOAD)
        completion = client_of(server).chat.completions.create(**body)
        assert json.loads(completion.choices[0].message.content) == EXPECTED
        assert completion.object == "chat.completion" and completion.model == "local"
        assert completion.choices[0].finish_reason == "stop" and completion.choices[0].message.refusal is None
        usage = completion.usage
        assert usage.completion_tokens == -(-len(completion.choices[0].message.content) // 4)
        chars = sum(len(m["content"]) for m in body["messages"])
        assert usage.prompt_tokens == -(-chars // 4)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        # a retry turn (4 messages) gets the same deterministic reply
        retry = {**body, "messages": build_messages(PromptTemplate.load(), PAYLOAD, ("{}", ["bad"]))}
        again = client_of(server).chat.completions.create(**retry)
        assert json.loads(again.choices[0].message.content) == EXPECTED
    assert server.received == 2
    assert server.served == {body_key(body): 1, body_key(retry): 1}
    assert server.statuses == {200: 2}


def test_keep_mode_bare_region_and_plain_mentions():
    reply = json.loads(SceneResponder(SCENES)(body_of(KEEP_PAYLOAD)).content)
    assert reply == {
        "objects": [{"object": 0, "expression": "the green square", "head_noun": "square"}],
        "question": "Which way does the green <ins>square</ins> move?\n(A) Up\n(B) Down",
        "answer": None,
    }
    payload = {
        **PAYLOAD,
        "answer": "The red circle moves left. <object1> [<region>] stays; the blue circle too.",
    }
    answer = json.loads(SceneResponder(SCENES)(body_of(payload)).content)["answer"]
    assert (
        answer
        == "The red <ins>circle</ins> moves left. The blue <ins>disc</ins> stays; the blue <ins>disc</ins> too."
    )


def test_unknown_record_is_a_400():
    with LocalLLMServer(SceneResponder(SCENES)) as server:
        with pytest.raises(openai.BadRequestError, match="unknown record id"):
            client_of(server).chat.completions.create(**body_of({**PAYLOAD, "id": "nope"}))
        assert server.statuses == {400: 1} and not server.served


def _content_fault_check(fault: str, reply: Reply, base: dict) -> None:
    if fault == "invalid_json":
        with pytest.raises(ValueError):
            json.loads(reply.content)
        return
    if fault == "truncated":
        full = json.dumps(base, ensure_ascii=False)
        assert reply.finish_reason == "length" and reply.content == full[: len(full) // 2]
        return
    if fault == "refusal":
        assert reply.content == REFUSAL_TEXT and reply.refusal == REFUSAL_TEXT
        return
    got = json.loads(reply.content)
    q, a = got["question"], got["answer"]
    changed = {k for k in base if got[k] != base[k]}
    expected_changes = {
        "leak_region": {"question"},
        "leak_object": {"question"},
        "tag_adjective": {"objects", "question", "answer"},
        "tag_determiner": {"objects", "question", "answer"},
        "inconsistent_tags": {"answer"},
        "swapped_order": {"question"},
        "changed_facts": {"answer"},
        "mask_language": {"question"},
    }[fault]
    assert changed == expected_changes
    if fault == "leak_region":
        assert "<region>" in q and q.replace("<region>", "") == base["question"]
    elif fault == "leak_object":
        assert "<object1>" in q and q.replace("<object1>", "") == base["question"]
    elif fault == "tag_adjective":
        assert got["objects"][0]["head_noun"] == "red" and "the <ins>red</ins> circle" in q
        assert "<ins>circle</ins>" not in q + a and a.startswith("The <ins>red</ins> circle moves left")
    elif fault == "tag_determiner":
        assert got["objects"][0]["head_noun"] == "the" and "<ins>the</ins> red circle" in q
        assert a.startswith("<ins>The</ins> circle moves left")
    elif fault == "inconsistent_tags":
        assert "<ins>circle</ins>" in q and a.startswith("The <ins>shape</ins> moves left")
    elif fault == "swapped_order":
        assert q.startswith(
            "There are 2 objects in the video: the blue <ins>disc</ins>, the red <ins>circle</ins>."
        )
    elif fault == "changed_facts":
        assert a == base["answer"].replace("left", "right")
    elif fault == "mask_language":
        assert "the red <ins>circle</ins>, outlined by the red contour," in q


@pytest.mark.parametrize("fault", [*CONTENT_FAULTS, "http_429", "http_500", "reset", "hang", "ok"])
def test_each_fault_then_ok(fault):
    scene = SceneResponder(SCENES)
    responder = FaultResponder(scene, {"r1": [fault]}, hang_s=0.5)
    body = body_of(PAYLOAD)
    reply = responder(body)
    if fault in CONTENT_FAULTS:
        assert reply.status == 200
        _content_fault_check(fault, reply, EXPECTED)
    elif fault == "http_429":
        assert reply.status == 429 and reply.headers == {"Retry-After": "1"}
    elif fault == "http_500":
        assert reply.status == 500
    elif fault in ("reset", "hang"):
        assert reply.action == fault and reply.delay_s == (0.5 if fault == "hang" else 0.0)
    else:
        assert reply == scene(body)
    # the list is consumed: the next request for the record gets the base reply; other records are untouched
    assert responder(body) == scene(body) and responder.remaining("r1") == []
    assert responder(body_of(KEEP_PAYLOAD)) == scene(body_of(KEEP_PAYLOAD))


def test_faults_with_kept_answer_change_the_question():
    scene = SceneResponder(SCENES)
    base = json.loads(scene(body_of(KEEP_PAYLOAD)).content)
    responder = FaultResponder(scene, {"r2": ["changed_facts", "inconsistent_tags", "swapped_order"]})
    changed = json.loads(responder(body_of(KEEP_PAYLOAD)).content)
    assert changed["answer"] is None and changed["question"] == base["question"].replace("(A) Up", "(A) Down")
    inconsistent = json.loads(responder(body_of(KEEP_PAYLOAD)).content)
    assert inconsistent["question"] == base["question"] + " (the <ins>shape</ins>)"
    assert json.loads(responder(body_of(KEEP_PAYLOAD)).content) == base  # one object: nothing to swap
    with pytest.raises(ValueError, match="unknown faults"):
        FaultResponder(scene, {"r1": ["nonsense"]})


def test_transport_faults_through_the_client():
    faults = {"r1": ["http_429", "http_500", "reset", "hang", "ok"]}
    with LocalLLMServer(FaultResponder(SceneResponder(SCENES), faults, hang_s=1.0)) as server:
        client = client_of(server)
        body = body_of(PAYLOAD)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(**body)
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(**body)
        with pytest.raises(openai.APIConnectionError) as err:
            client.chat.completions.create(**body)
        assert not isinstance(err.value, openai.APITimeoutError)
        start = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.3).chat.completions.create(**body)
        assert time.monotonic() - start < 0.9
        completion = client.chat.completions.create(**body)  # the list is exhausted: the real reply
        assert json.loads(completion.choices[0].message.content) == EXPECTED
    assert server.received == 5 and server.served == {body_key(body): 1}
    assert server.statuses == {429: 1, 500: 1, 200: 1} and server.actions == {"reset": 1, "hang": 1}


def test_concurrency_latency_and_on_request_hook():
    seen: list[int] = []
    lock = threading.Lock()

    def on_request(count, body):
        with lock:
            seen.append(count)

    with LocalLLMServer(SceneResponder(SCENES), latency_s=0.3, on_request=on_request) as server:
        client = client_of(server)
        bodies = [body_of(PAYLOAD, model=f"m{i}") for i in range(64)]
        start = time.monotonic()
        with ThreadPoolExecutor(64) as pool:
            replies = list(pool.map(lambda b: client.chat.completions.create(**b), bodies))
        elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"64 concurrent requests with 0.3 s latency took {elapsed:.2f} s"
    assert all(json.loads(r.choices[0].message.content) == EXPECTED for r in replies)
    assert sorted(seen) == list(range(1, 65)) and server.received == 64
    assert server.served == {body_key(b): 1 for b in bodies}


def _http(method: str, url: str, data: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_unknown_route_and_bad_body():
    with LocalLLMServer(SceneResponder(SCENES)) as server:
        status, body = _http("GET", server.base_url + "/embeddings")
        assert status == 404 and body["error"]["code"] == "unknown_url"
        status, body = _http("POST", server.base_url + "/chat/completions", b"{not json")
        assert status == 400 and "error" in body
        status, body = _http("POST", server.base_url + "/chat/completions", b'{"model": "m"}')
        assert status == 400 and body["error"]["code"] == "missing_required_parameter"
        assert _http("GET", server.base_url + "/models")[1]["data"][0]["id"] == "local-llm"
    assert server.received == 0


def _batch_lines(payloads: list[dict]) -> bytes:
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body_of(p)}
        for i, p in enumerate(payloads)
    ]
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def _wait(client, batch_id: str):
    deadline = time.monotonic() + 5
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "expired", "failed", "cancelled") or time.monotonic() > deadline:
            return batch
        time.sleep(0.02)


def _jsonl(client, file_id: str) -> dict[str, dict]:
    return {
        line["custom_id"]: line for line in map(json.loads, client.files.content(file_id).text.splitlines())
    }


def test_batch_flow_with_an_error_line():
    payloads = [
        PAYLOAD,
        KEEP_PAYLOAD,
        {**PAYLOAD, "kind": "caption"},
    ]  # r1 is asked twice: c0 ok, c2 gets a 500
    responder = FaultResponder(SceneResponder(SCENES), {"r1": ["ok", "http_500"]})
    with LocalLLMServer(responder) as server:
        client = client_of(server)
        data = _batch_lines(payloads)
        uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
        assert uploaded.bytes == len(data) and uploaded.purpose == "batch"
        assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
        assert client.files.content(uploaded.id).content == data  # the multipart upload is byte-exact
        for raw in (b"", "h\u00e9 \u2603\r\nx\n\r\n".encode(), bytes(range(256)) * 4):
            assert (
                client.files.content(client.files.create(file=("f", raw), purpose="batch").id).content == raw
            )
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert batch.status in ("validating", "in_progress", "finalizing", "completed")
        batch = _wait(client, batch.id)
        assert batch.status == "completed" and batch.completed_at is not None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
            3,
            2,
            1,
        )
        output, errors = _jsonl(client, batch.output_file_id), _jsonl(client, batch.error_file_id)
        assert set(output) == {"c0", "c1"} and set(errors) == {"c2"}
        ok = output["c0"]
        assert (
            ok["error"] is None and ok["id"].startswith("batch_req_") and ok["response"]["status_code"] == 200
        )
        assert ok["response"]["body"]["object"] == "chat.completion"
        assert json.loads(ok["response"]["body"]["choices"][0]["message"]["content"]) == EXPECTED
        assert (
            json.loads(output["c1"]["response"]["body"]["choices"][0]["message"]["content"])["answer"] is None
        )
        bad = errors["c2"]
        assert bad["error"] is None and bad["response"]["status_code"] == 500
        assert bad["response"]["body"]["error"]["type"] == "server_error"
        assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
        assert server.received == 0 and server.batch_lines == 3  # batch lines are not chat requests
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_nope")


def test_batch_drop_every_expires_and_limits_fail():
    with LocalLLMServer(SceneResponder(SCENES), batch_drop_every=2, batch_max_lines=4) as server:
        client = client_of(server)
        uploaded = client.files.create(file=("in.jsonl", _batch_lines([PAYLOAD] * 4)), purpose="batch")
        batch = _wait(client, client.batches.create(**_batch_args(uploaded.id)).id)
        assert batch.status == "expired" and batch.expired_at is not None and batch.error_file_id is None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
            4,
            2,
            0,
        )
        assert set(_jsonl(client, batch.output_file_id)) == {
            "c0",
            "c2",
        }  # c1 and c3: neither output nor error

        too_many = client.files.create(file=("big.jsonl", _batch_lines([PAYLOAD] * 5)), purpose="batch")
        batch = _wait(client, client.batches.create(**_batch_args(too_many.id)).id)
        assert batch.status == "failed" and batch.errors.data[0].code == "too_many_requests"
        assert batch.output_file_id is None and batch.error_file_id is None
        with pytest.raises(openai.BadRequestError):
            client.batches.create(**{**_batch_args(uploaded.id), "completion_window": "1h"})


def test_batch_cancel_keeps_the_finished_lines():
    gate = threading.Event()
    scene = SceneResponder(SCENES)

    def slow(body):
        gate.wait(5)
        return scene(body)

    with LocalLLMServer(slow) as server:
        client = client_of(server)
        uploaded = client.files.create(file=("in.jsonl", _batch_lines([PAYLOAD] * 3)), purpose="batch")
        batch = client.batches.create(**_batch_args(uploaded.id))
        deadline = time.monotonic() + 5
        while client.batches.retrieve(batch.id).status != "in_progress" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.batches.cancel(batch.id).status == "cancelling"
        gate.set()
        batch = _wait(client, batch.id)
        assert batch.status == "cancelled" and batch.cancelled_at is not None
        assert batch.request_counts.completed == 1 and set(_jsonl(client, batch.output_file_id)) == {"c0"}
        assert client.batches.cancel(batch.id).status == "cancelled"


def _batch_args(file_id: str) -> dict:
    return {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}


def test_cli_prints_the_url_and_stops_on_sigterm(tmp_path):
    scenes = tmp_path / "scenes.json"
    scenes.write_text(json.dumps(SCENES))
    command = [sys.executable, "-m", "swim.data.nl_refer.local_llm", "--scenes", str(scenes)]
    repo = Path(__file__).resolve().parents[1]
    with subprocess.Popen(
        command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as proc:
        try:
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout=10)
            assert lines and lines[0].startswith("LOCAL_LLM_URL=http://127.0.0.1:"), lines
            url = lines[0].strip().split("=", 1)[1]
            assert url.endswith("/v1")
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
            completion = client.chat.completions.create(**body_of(PAYLOAD))
            assert json.loads(completion.choices[0].message.content) == EXPECTED
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
