import logging
import os
from pathlib import Path

import pytest
import torch

from swim.tiny import FAMILY_NAMES, build_tiny_checkpoint, serve_from_hub_cache


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """`get(family)`: a tiny random checkpoint of that family, built once per session."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{family}"), family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_checkpoints):
    """A tiny random Qwen2.5-VL checkpoint (4 text layers, GQA 4/2 heads, 2 vision blocks)."""
    return tiny_checkpoints("qwen2_5_vl")


@pytest.fixture(scope="session")
def hub_cache(tiny_ckpt, tmp_path_factory):
    """An offline hub cache serving the tiny Qwen2.5-VL checkpoint as the paper's base model
    (`checkpoint_checks.HUB_NAME`); subprocesses get it through `checkpoint_checks.hub_environment(hub_cache)`."""
    from checkpoint_checks import HUB_NAME

    cache = tmp_path_factory.mktemp("hub_cache")
    serve_from_hub_cache(tiny_ckpt, cache, HUB_NAME)
    return cache


@pytest.fixture(params=FAMILY_NAMES)
def family_ckpt(request, tiny_checkpoints):
    """A tiny checkpoint of each supported family (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5)."""
    return tiny_checkpoints(request.param)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5-VL tokenizer folder (`make real-tokenizer`, part of `make test`) or $SWIM_QWEN_TOKENIZER."""
    path = Path(
        os.environ.get("SWIM_QWEN_TOKENIZER")
        or Path(__file__).resolve().parents[1] / ".cache" / "qwen25vl-tokenizer"
    )
    if not (path / "tokenizer_config.json").is_file():
        pytest.fail(f"no Qwen2.5-VL tokenizer at {path}: run `make real-tokenizer`", pytrace=False)
    return path
