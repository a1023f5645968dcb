"""Data mixtures: a YAML list of record files, each with a sampling strategy.

```yaml
root: ..            # optional: folder that relative json_path/data_root resolve against (relative to
                    # this YAML's folder; default: the YAML's folder)
datasets:
  - json_path: data/NL-Refer/train/refined-format-videorefer-qa-0-10k.json
    data_root: data/videos       # optional: media root (default: the json's folder)
    sampling_strategy: random:50%  # all | first:N | end:N | random:N; N an integer or P% (ceil)
```

`load_mixture(yaml_path, seed)` returns the selected records, each carrying its ``data_root``; ``random:N`` is
seeded (the same seed gives the same selection, independently per entry).
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swim.data.records import Record, RecordError, load_records

logger = logging.getLogger(__name__)

_STRATEGY_RE = re.compile(r"^(all)$|^(first|end|random):(\d+(?:\.\d+)?%|\d+)$")


class MixtureError(ValueError):
    """A problem in a mixture YAML, naming the file, the entry index and the field."""

    def __init__(self, source: str | Path, entry: int | None, field: str, reason: str):
        self.source, self.entry, self.field, self.reason = str(source), entry, field, reason
        where = f"datasets[{entry}]." if entry is not None else ""
        super().__init__(f"{source}: {where}{field}: {reason}")


@dataclass(frozen=True)
class SamplingStrategy:
    """``all``, or ``first`` / ``end`` / ``random`` with a count or a percentage (rounded up)."""

    kind: str = "all"
    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> SamplingStrategy:
        m = _STRATEGY_RE.match(str(text).strip())
        if not m:
            raise ValueError(f"expected all | first:N | end:N | random:N (N integer or P%), got {text!r}")
        if m.group(1):
            return cls()
        kind, n = m.group(2), m.group(3)
        if n.endswith("%"):
            p = float(n[:-1])
            if not 0 <= p <= 100:
                raise ValueError(f"percentage must be within 0..100, got {n}")
            return cls(kind, percent=p)
        return cls(kind, count=int(n))

    def size(self, total: int) -> int:
        if self.kind == "all":
            return total
        n = math.ceil(self.percent * total / 100) if self.percent is not None else self.count
        return min(n, total)

    def select(self, total: int, rng: random.Random) -> list[int]:
        """Indices (in file order) of the selected records out of ``total``."""
        n = self.size(total)
        if self.kind in ("all", "first"):
            return list(range(n))
        if self.kind == "end":
            return list(range(total - n, total))
        return sorted(rng.sample(range(total), n))

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        return f"{self.kind}:{f'{self.percent:g}%' if self.percent is not None else self.count}"


@dataclass
class MixtureEntry:
    """One ``datasets:`` item; paths are resolved by `MixtureConfig` (relative to its root)."""

    json_path: Path
    data_root: str | None = None
    sampling_strategy: SamplingStrategy = field(default_factory=SamplingStrategy)
    entry: int = 0  # position in the YAML list (for messages)
    source: str = "<mixture>"

    def __post_init__(self):
        if not isinstance(self.json_path, (str, Path)) or not str(self.json_path).strip():
            raise MixtureError(self.source, self.entry, "json_path", "missing or not a string")
        self.json_path = Path(self.json_path)
        if self.json_path.suffix not in (".json", ".jsonl"):
            raise MixtureError(
                self.source, self.entry, "json_path", f"must end in .json or .jsonl: {self.json_path}"
            )
        if self.data_root is not None and not isinstance(self.data_root, (str, Path)):
            raise MixtureError(self.source, self.entry, "data_root", "must be a string path")
        if isinstance(self.sampling_strategy, str):
            try:
                self.sampling_strategy = SamplingStrategy.parse(self.sampling_strategy)
            except ValueError as e:
                raise MixtureError(self.source, self.entry, "sampling_strategy", str(e)) from None
        elif not isinstance(self.sampling_strategy, SamplingStrategy):
            raise MixtureError(self.source, self.entry, "sampling_strategy", "must be a string such as 'all'")


@dataclass
class MixtureConfig:
    datasets: list[MixtureEntry]
    source: str = "<mixture>"

    def __post_init__(self):
        if not self.datasets:
            raise MixtureError(self.source, None, "datasets", "empty: list at least one record file")

    @classmethod
    def from_dict(
        cls, data: Any, *, source: str | Path = "<mixture>", base_dir: str | Path = "."
    ) -> MixtureConfig:
        """Validate a parsed YAML mapping; relative paths resolve against ``base_dir`` / ``root``."""
        src = str(source)
        if not isinstance(data, dict):
            raise MixtureError(src, None, "<file>", "expected a mapping with a 'datasets' list")
        unknown = set(data) - {"datasets", "root"}
        if unknown:
            raise MixtureError(
                src, None, sorted(unknown)[0], "unknown top-level key (expected datasets, root)"
            )
        root = Path(base_dir) / str(data.get("root", "."))
        items = data.get("datasets")
        if not isinstance(items, list):
            raise MixtureError(src, None, "datasets", "missing or not a list")
        entries = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise MixtureError(src, i, "<entry>", f"expected a mapping, got {type(item).__name__}")
            unknown = set(item) - {"json_path", "data_root", "sampling_strategy"}
            if unknown:
                raise MixtureError(src, i, sorted(unknown)[0], "unknown key")
            entry = MixtureEntry(
                json_path=item.get("json_path"),
                data_root=item.get("data_root"),
                sampling_strategy=item.get("sampling_strategy", "all"),
                entry=i,
                source=src,
            )
            entry.json_path = _resolve(root, entry.json_path)
            if entry.data_root is not None:
                entry.data_root = str(_resolve(root, Path(entry.data_root)))
            entries.append(entry)
        return cls(entries, src)


def _resolve(root: Path, p: Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else (root / p).resolve()


def load_mixture_config(yaml_path: str | Path) -> MixtureConfig:
    """Parse and validate a mixture YAML (no record file is read)."""
    yaml_path = Path(yaml_path)
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise MixtureError(yaml_path, None, "<file>", f"cannot read: {e}") from None
    return MixtureConfig.from_dict(data, source=yaml_path, base_dir=yaml_path.parent)


def load_mixture(
    yaml_path: str | Path, seed: int = 42, *, errors: str = "collect"
) -> tuple[list[Record], list[RecordError]]:
    """Records of every entry, selected by its strategy, with ``data_root`` set; plus the malformed records
    left out (``errors="collect"``, counted and logged) or the first one raised (``errors="raise"``).

    Each ``random:N`` entry uses its own `random.Random` seeded from ``(seed, entry index)``, so adding an
    entry does not change the others' selections. Strategies apply to the file's records before malformed
    ones are dropped, so ``first:N`` means the first N records of the file.
    """
    config = load_mixture_config(yaml_path)
    records: list[Record] = []
    problems: list[RecordError] = []
    for e in config.datasets:
        if not e.json_path.exists():
            raise MixtureError(config.source, e.entry, "json_path", f"not found: {e.json_path}")
        recs, bad = load_records(e.json_path, data_root=e.data_root, errors=errors)
        total = len(recs) + len(bad)
        chosen = set(e.sampling_strategy.select(total, random.Random(f"{seed}:{e.entry}")))
        picked = [r for r in recs if r.position in chosen]
        problems += [b for b in bad if b.index in chosen]
        logger.info(
            "mixture %s: %s -> %d of %d records (%s)",
            config.source,
            e.json_path.name,
            len(picked),
            total,
            e.sampling_strategy,
        )
        records += picked
    if problems:
        logger.warning("mixture %s: %d malformed records left out", config.source, len(problems))
    return records, problems
