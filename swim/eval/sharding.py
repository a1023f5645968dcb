"""Sharding of evaluation items over processes, and the append-only JSONL stores they write to.

Every evaluation writes its per-item results as it goes, one JSON object per line, flushed and fsync'd, so a
crashed or interrupted run resumes where it stopped: on restart the items already in the store are skipped.
Sharded runs (one process per GPU) each write their own file, named by `shard_path`; a merge step reads all
of them back. Items are dealt round-robin (`i % num_shards == shard_index`), which balances long and short
items; merged results are sorted back into bench order, so they do not depend on the number of shards.

Each store starts with a header line ``{"__header__": {...}}`` that holds the run's fingerprint (model,
bench file, generation and video settings). Resuming into a store written with a different fingerprint is an
error, so stale predictions are never mixed with new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

HEADER_KEY = "__header__"


@dataclass(frozen=True)
class Shard:
    """Which part of the items this process handles (`index` in `0..count-1`)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"--num-shards must be >= 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard-index must be in [0, {self.count - 1}], got {self.index}")

    @property
    def suffix(self) -> str:
        """File-name suffix, empty for an unsharded run (``.shard-01-of-04``)."""
        return "" if self.count == 1 else f".shard-{self.index:02d}-of-{self.count:02d}"


def select_shard(items: Sequence[T], shard: Shard) -> list[T]:
    """The items of `shard`: every `count`-th item starting at `index` (round-robin)."""
    return [item for i, item in enumerate(items) if i % shard.count == shard.index]


def shard_path(out_dir: str | Path, stem: str, shard: Shard, ext: str = ".jsonl") -> Path:
    """``out_dir/stem[.shard-XX-of-NN].jsonl``."""
    return Path(out_dir) / f"{stem}{shard.suffix}{ext}"


def all_shard_paths(out_dir: str | Path, stem: str, num_shards: int, ext: str = ".jsonl") -> list[Path]:
    """The files of every shard of a run with `num_shards` shards (the single file when 1)."""
    return [shard_path(out_dir, stem, Shard(i, num_shards), ext) for i in range(num_shards)]


def detect_num_shards(out_dir: str | Path, stem: str, ext: str = ".jsonl") -> int:
    """How many shards the files in `out_dir` were written with (1 if only the unsharded file exists).

    Raises if there are none, or if shard files of different shard counts are mixed.
    """
    out_dir = Path(out_dir)
    counts = set()
    for path in out_dir.glob(f"{stem}.shard-*-of-*{ext}"):
        counts.add(int(path.name[: -len(ext)].rsplit("-of-", 1)[1]))
    if len(counts) > 1:
        raise ValueError(f"{out_dir}: shard files of different shard counts {sorted(counts)} for '{stem}'")
    if counts:
        return counts.pop()
    if (out_dir / f"{stem}{ext}").exists():
        return 1
    raise FileNotFoundError(f"{out_dir}: no '{stem}{ext}' or '{stem}.shard-*-of-*{ext}' files to merge")


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable config."""
    blob = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class JsonlStore:
    """An append-only JSONL file of records keyed by ``record[key_field]``, durable line by line.

    Opening reads the existing lines (a truncated last line from a crash is ignored with a warning) and checks
    the header's fingerprint; `append` writes one line and fsyncs it. Later lines win on duplicate keys.
    """

    def __init__(self, path: str | Path, *, key_field: str = "key", header: dict[str, Any] | None = None):
        self.path = Path(path)
        self.key_field = key_field
        self.header = header
        self.records: dict[str, dict[str, Any]] = {}
        self._file = None
        existing_header = self._load()
        self.header_from_file = existing_header
        if header is not None and existing_header is not None:
            old, new = existing_header.get("fingerprint"), header.get("fingerprint")
            if old != new:
                raise ValueError(
                    f"{self.path} was written by a run with a different configuration (fingerprint {old} vs "
                    f"{new}); use another --out directory or pass --overwrite to start afresh"
                )

    def _load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        header = None
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s:%d: unreadable line ignored (interrupted write?)", self.path, lineno)
                    continue
                if HEADER_KEY in record:
                    header = header or record[HEADER_KEY]
                elif self.key_field in record:
                    self.records[str(record[self.key_field])] = record
                else:
                    logger.warning("%s:%d: line without '%s' ignored", self.path, lineno, self.key_field)
        return header

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` as one line and make it durable before returning."""
        if self._file is None:
            self._open_for_append()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[str(record[self.key_field])] = record

    def _open_for_append(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        needs_newline = False
        if not fresh:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._file = self.path.open("a", encoding="utf-8")
        if needs_newline:  # a crash left half a line: end it so the next record starts on its own line
            self._file.write("\n")
        if fresh and self.header is not None:
            self._file.write(json.dumps({HEADER_KEY: self.header}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_shard_stores(
    paths: Iterable[Path], *, key_field: str = "key"
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Records of all `paths` (which must all exist) and their headers, one per file.

    Raises if a file is missing, if the headers' fingerprints differ, or if a key appears in two files.
    """
    records: dict[str, dict[str, Any]] = {}
    headers: list[dict[str, Any]] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"missing shard file {path}: did that shard finish?")
        store = JsonlStore(path, key_field=key_field)
        if store.header_from_file is not None:
            headers.append(store.header_from_file)
        for key, record in store.records.items():
            if key in records:
                raise ValueError(f"item '{key}' appears in more than one shard file ({path})")
            records[key] = record
    prints = {h.get("fingerprint") for h in headers}
    if len(prints) > 1:
        raise ValueError(
            f"shard files were written with different configurations: fingerprints {sorted(prints)}"
        )
    return records, headers
