"""`swim pretrain`: the demos' base is built once per content hash, reused, and stock-loadable."""

import json
import shutil
from pathlib import Path

import pytest

from swim.demos import pretrain
from swim.demos.pretrain import PretrainConfig, build_base, cached_base

ROOT = Path(__file__).resolve().parents[1]


def _config(folder: Path, **changes) -> PretrainConfig:
    """The shipped config, copied with its recipe into `folder`, at toy size."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("demo_base.yaml", "demo_base_cpu.yaml"):
        shutil.copy(ROOT / "recipes" / name, folder / name)
    cfg = PretrainConfig.from_yaml(folder / "demo_base.yaml")
    cfg.num_videos, cfg.max_steps = 6, 2
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def test_hash_follows_content_not_location(tmp_path):
    a, b = _config(tmp_path / "a"), _config(tmp_path / "b")
    assert a.content_hash() == b.content_hash()  # same settings and recipe text, another folder
    assert _config(tmp_path / "c", num_videos=7).content_hash() != a.content_hash()
    recipe = Path(b.recipe)
    recipe.write_text(recipe.read_text().replace("learning_rate: 1.0e-3", "learning_rate: 2.0e-3"))
    assert b.content_hash() != a.content_hash()
    recipe.write_text(
        "# a comment\n" + recipe.read_text().replace("learning_rate: 2.0e-3", "learning_rate: 1.0e-3")
    )
    assert b.content_hash() == a.content_hash()  # comments do not rebuild


def test_unknown_setting_names_the_file(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text("recipe: demo_base_cpu.yaml\nnum_vidoes: 3\n")
    with pytest.raises(ValueError, match=r"base\.yaml.*num_vidoes"):
        PretrainConfig.from_yaml(path)


def test_build_once_then_reuse(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    cfg = _config(tmp_path / "cfg")
    cache = tmp_path / "cache"
    assert cached_base(cfg, cache) is None
    base = build_base(cfg, cache)
    assert base == cache / f"base-{cfg.content_hash()}" and cached_base(cfg, cache) == base
    summary = json.loads((base / "base.json").read_text())
    assert summary["steps"] == 2 and summary["hash"] == cfg.content_hash()
    assert not list(base.glob("checkpoint-*")) and not list(
        cache.glob(".build-*")
    )  # no optimizer state, no leftovers
    Qwen2_5_VLForConditionalGeneration.from_pretrained(base)  # a stock checkpoint
    AutoTokenizer.from_pretrained(base)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached base must not be trained again")

    monkeypatch.setattr(pretrain.subprocess, "call", no_training)
    assert build_base(cfg, cache) == base
