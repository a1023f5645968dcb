"""The rewriting request: a versioned prompt file, the record payload, the fixed reply schema, the request id.

Any OpenAI-compatible server can answer (a paid API, ``vllm serve``, the stand-in of `swim.data.nl_refer.local_llm`)
because the contract is plain data:

- the prompt lives in ``prompts/<name>.md`` (a ``version:`` line, then ``## system`` / ``## user`` / ``## retry``
  sections); its version goes into every output record's metadata and its text into every request id;
- the user message is the prompt's user section, then ``RECORD:`` and a JSON payload holding the record's
  original turns verbatim (placeholders included) and its object list (`record_payload`);
- the reply is one JSON object of `REPLY_SCHEMA`:
  ``{"objects": [{"object": 0, "expression": "the small lion cub", "head_noun": "cub"}, ...],
  "question": "... the small lion <ins>cub</ins> ...", "answer": "... the <ins>cub</ins> ..." | null}``
  where ``object`` is the annotation index and ``answer`` is null where the answer is kept (``answer_mode``
  ``keep``: Bench-Q, whose options and answer must not change, and Bench-D, whose caption is the reference);
- a rejected reply is retried once in the same conversation: the previous reply as the assistant turn, then the
  prompt's retry section with the validator's reasons (`build_messages`).

The request id (`request_id`) is a hash of the record's index and the whole request body (prompt text, record
text, model, sampling parameters, response format): the same request always has the same id, so the response log
can tell what was already answered, and any change of prompt, model or parameters makes new requests.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from swim.data.records import strip_media_placeholder

PROMPT_DIR = Path(__file__).with_name("prompts")
DEFAULT_PROMPT = "rewrite_v1"
RECORD_MARKER = "RECORD:"
REPLY_SCHEMA_NAME = "nl_refer_rewrite"

REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "objects": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "object": {"type": "integer"},
                    "expression": {"type": "string"},
                    "head_noun": {"type": "string"},
                },
                "required": ["object", "expression", "head_noun"],
                "additionalProperties": False,
            },
        },
        "question": {"type": "string"},
        "answer": {"type": ["string", "null"]},
    },
    "required": ["objects", "question", "answer"],
    "additionalProperties": False,
}

# Kinds whose answer is kept verbatim (the reply's "answer" must be null).
ANSWER_KEPT = ("bench_q", "bench_d")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    system: str
    user: str
    retry: str
    text: str  # the whole file: part of every request id

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_PROMPT) -> PromptTemplate:
        """A prompt file by name (``prompts/<name>.md`` in this package) or by path."""
        path = Path(name_or_path)
        if not path.suffix:
            path = PROMPT_DIR / f"{name_or_path}.md"
        if not path.is_file():
            known = sorted(p.stem for p in PROMPT_DIR.glob("*.md"))
            raise FileNotFoundError(f"prompt {name_or_path!r} not found ({path}); packaged prompts: {known}")
        text = path.read_text(encoding="utf-8")
        version = re.search(r"^version:\s*(\S+)\s*$", text, re.M)
        sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
        missing = [s for s in ("system", "user", "retry") if s not in sections]
        if version is None or missing:
            raise ValueError(
                f"{path}: needs a 'version:' line and sections ## system/user/retry (missing {missing})"
            )
        if "{reasons}" not in sections["retry"]:
            raise ValueError(f"{path}: the ## retry section must contain {{reasons}}")
        return cls(
            name=path.stem,
            version=version.group(1),
            system=sections["system"].strip(),
            user=sections["user"].strip(),
            retry=sections["retry"].strip(),
            text=text,
        )


@dataclass(frozen=True)
class RequestParams:
    """Everything besides the messages that goes into a request body (and so into its id)."""

    model: str
    temperature: float = 0.0
    max_tokens: int = 1024
    response_format: str = (
        "json_schema"  # json_schema | json_object | none (servers without structured output)
    )
    seed: int | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)


def answer_mode(kind: str) -> str:
    return "keep" if kind in ANSWER_KEPT else "rewrite"


def record_payload(record) -> dict[str, Any]:
    """The JSON the model reads for one `swim.data.nl_refer.raw.RawRecord`: its turns verbatim and its objects."""
    objects = []
    for k, n in enumerate(record.object_ids()):
        objects.append({"object": k, "placeholder": "<region>" if n is None else f"<object{n}>"})
    payload: dict[str, Any] = {
        "id": record.id if record.id is not None else record.index,
        "kind": record.kind,
        "question": strip_media_placeholder(record.question),
        "answer": record.answer,
        "answer_mode": answer_mode(record.kind),
        "objects": objects,
    }
    if record.kind == "bench_q":
        payload["options"] = list(record.obj.get("options") or [])
    return payload


def user_message(template: PromptTemplate, payload: dict[str, Any]) -> str:
    return f"{template.user}\n\n{RECORD_MARKER}\n{json.dumps(payload, ensure_ascii=False, indent=1)}"


def build_messages(
    template: PromptTemplate, payload: dict[str, Any], previous: tuple[str, list[str]] | None = None
) -> list[dict[str, str]]:
    """The chat messages of a first request, or (``previous`` = (reply text, reasons)) of its retry."""
    messages = [
        {"role": "system", "content": template.system},
        {"role": "user", "content": user_message(template, payload)},
    ]
    if previous is not None:
        reply, reasons = previous
        messages.append({"role": "assistant", "content": reply})
        messages.append({"role": "user", "content": template.retry.replace("{reasons}", "\n".join(reasons))})
    return messages


def request_body(
    params: RequestParams,
    messages: list[dict[str, str]],
    *,
    schema: dict[str, Any] = REPLY_SCHEMA,
    schema_name: str = REPLY_SCHEMA_NAME,
) -> dict[str, Any]:
    """An OpenAI chat-completions request body (``params``: anything with `RequestParams`' fields)."""
    body: dict[str, Any] = {
        "model": params.model,
        "messages": messages,
        "temperature": params.temperature,
        "max_tokens": params.max_tokens,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.response_format == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": schema_name, "strict": True, "schema": schema},
        }
    elif params.response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif params.response_format != "none":
        raise ValueError(
            f"response_format must be json_schema, json_object or none, got {params.response_format!r}"
        )
    return body


def request_id(index: str, body: dict[str, Any]) -> str:
    """Deterministic id of one request: sha256 of the record index and the canonical request body."""
    canonical = json.dumps(
        {"index": index, "body": body}, sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    return "req-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def payload_from_messages(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The record payload of a request (the inverse of `user_message`; used by stand-in servers)."""
    for message in messages:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str) and RECORD_MARKER in content:
            return json.loads(content.split(RECORD_MARKER, 1)[1])
    raise ValueError("no RECORD: payload in the request's user messages")
