import logging

import pytest
import torch

from swim.tiny import build_tiny_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Qwen2.5-VL checkpoint (4 text layers, GQA 4/2 heads, 2 vision blocks)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
