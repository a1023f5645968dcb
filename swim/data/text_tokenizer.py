"""A tokenizer for the data tools that does not import torch: ``tokenizers`` + the checkpoint's chat template.

``swim data build`` and ``swim data synonyms`` check every tagged span with the training aligner
(`swim.data.tags.align_text`) and the family's tokenizer. transformers' tokenizers import torch (220 MB of
resident memory before a byte is read), which a process that streams multi-GB files on a CPU box can do without.
`TextTokenizer` loads the same ``tokenizer.json`` with the ``tokenizers`` library and renders the same chat
template with jinja2 in a sandbox, the way transformers does (``trim_blocks``, ``lstrip_blocks``, loop controls,
an unescaped ``tojson``, ``raise_exception``, ``strftime_now``), and offers the three calls the aligner makes:
``apply_chat_template(messages, tokenize=False)``, ``__call__(text, add_special_tokens=False,
return_offsets_mapping=True)`` and ``convert_tokens_to_ids``. Its renderings, ids and offsets equal
``AutoTokenizer``'s (tests/test_text_tokenizer.py, every family).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def resolve_folder(name_or_path: str | Path) -> Path:
    """A local folder, or a hub name through huggingface_hub's cache (downloads only the tokenizer files)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["tokenizer.json", *TEMPLATE_FILES]))


def read_chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            template = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class TextTokenizer:
    """The tokenizer calls `swim.data.tags.align_text` makes, without transformers or torch."""

    def __init__(
        self, backend, chat_template: str | None, special_tokens: dict[str, str | None] | None = None
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}
        self._template = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> TextTokenizer:
        from tokenizers import Tokenizer

        folder = resolve_folder(name_or_path)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json (a fast tokenizer is needed)")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        special = {
            k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), read_chat_template(folder), special)

    def _compiled(self):
        if self._template is None:
            if self.chat_template is None:
                raise ValueError("this tokenizer has no chat template")
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(
                    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
                )

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template

    def apply_chat_template(
        self, messages: list[dict], *, tokenize: bool = False, add_generation_prompt: bool = False, **kwargs
    ) -> str:
        if tokenize:
            raise NotImplementedError("TextTokenizer renders text only (tokenize=False)")
        return self._compiled().render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
        )

    def __call__(
        self, text: str, *, add_special_tokens: bool = False, return_offsets_mapping: bool = False
    ) -> dict[str, list]:
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        out: dict[str, list] = {"input_ids": list(enc.ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = [tuple(o) for o in enc.offsets]
        return out

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)
