"""`swim.checkpoint` and `swim.tiny.serve_from_hub_cache`, each piece on its own (the training runs of every
back-end check whole folders: tests/test_distributed.py, tests/test_train_entry.py)."""

import json

import pytest
import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor, AutoTokenizer
from transformers.conversion_mapping import get_model_conversion_mapping

from swim.checkpoint import (
    PROCESSOR_FILES,
    RunProcessor,
    check_stock_layout,
    drop_tied_aliases,
    saved_weight_names,
    stock_layout,
    stock_weight_names,
)
from swim.modeling.model import stock_model_class
from swim.tiny import serve_from_hub_cache


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return stock_model_class(tiny_ckpt).from_pretrained(tiny_ckpt)


def test_stock_weight_names_are_what_the_stock_class_writes(tiny_ckpt):
    """`swim tiny` writes with `save_pretrained` of a freshly built stock model: the reference layout."""
    assert stock_weight_names(AutoConfig.from_pretrained(tiny_ckpt)) == saved_weight_names(tiny_ckpt)
    assert any(
        n.startswith("model.layers.") for n in saved_weight_names(tiny_ckpt)
    )  # Qwen2.5-VL's legacy names


def test_a_zero3_style_record_of_renamings_saves_the_stock_layout_inside_stock_layout(model, tmp_path):
    """Under ZeRO-3, transformers records the legacy renamings too (`model.language_model.model -> ...`); reverting
    them wrote the language model under `model.model.*`. `stock_layout` saves the stock names whatever was recorded."""
    recorded = model._weight_conversions
    zero3 = get_model_conversion_mapping(model, add_legacy=True)  # what ZeRO-3 loading records
    model._weight_conversions = zero3
    try:
        model.save_pretrained(tmp_path / "plain")
        with stock_layout(model):
            model.save_pretrained(tmp_path / "stock")
        assert model._weight_conversions is zero3  # restored after the block
    finally:
        model._weight_conversions = recorded
    assert any(n.startswith("model.model.") for n in saved_weight_names(tmp_path / "plain"))
    with pytest.raises(RuntimeError, match=r"not in the stock layout .* unexpected tensor names"):
        check_stock_layout(tmp_path / "plain")
    check_stock_layout(tmp_path / "stock")


def test_tied_aliases_of_a_gathered_state_dict_are_dropped(model):
    """A gathered (cloned) state dict no longer shares the tied embedding's storage: `lm_head.weight` would be
    written as a tensor of its own."""
    assert model.config.get_text_config().tie_word_embeddings
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    kept = drop_tied_aliases(model, gathered)
    assert "lm_head.weight" in gathered and "lm_head.weight" not in kept
    assert set(gathered) - set(kept) == {"lm_head.weight"}


def test_run_processor_writes_both_processor_formats_with_the_runs_tokenizer(tiny_ckpt, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    tokenizer.add_tokens(["[SEG]"], special_tokens=True)
    RunProcessor(tiny_ckpt, tokenizer).save(tmp_path)
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        assert (tmp_path / name).exists(), name
    reloaded, base = AutoProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tiny_ckpt)
    assert "[SEG]" in reloaded.tokenizer.get_vocab()
    assert reloaded.video_processor.to_dict() == base.video_processor.to_dict()
    assert reloaded.chat_template == base.chat_template


def test_run_processor_without_torchvision_copies_the_base_files(tiny_ckpt, tmp_path, monkeypatch, caplog):
    """Where `AutoProcessor` cannot be built (transformers' video processors need torchvision), the base's files
    are copied as they are, and the log says so."""

    def no_torchvision(*args, **kwargs):
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", no_torchvision)
    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    RunProcessor(tiny_ckpt, tokenizer).save(tmp_path)
    assert "cannot be built here" in caplog.text
    for name in PROCESSOR_FILES:
        if (tiny_ckpt / name).exists():
            assert (tmp_path / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name
    assert (tmp_path / "preprocessor_config.json").exists() and (tmp_path / "tokenizer.json").exists()


def test_hub_cache_serves_a_folder_under_a_hub_name(tiny_ckpt, tmp_path):
    snapshot = serve_from_hub_cache(tiny_ckpt, tmp_path, "Org/Some-Model")
    again = serve_from_hub_cache(tiny_ckpt, tmp_path, "Org/Some-Model")
    assert snapshot == again  # content-addressed: serving twice gives the same revision
    resolved = snapshot_download("Org/Some-Model", cache_dir=tmp_path, local_files_only=True)
    assert sorted(p.name for p in tiny_ckpt.iterdir() if p.is_file()) == sorted(
        p.name for p in snapshot.iterdir()
    )
    assert str(resolved) == str(snapshot) and all(p.is_symlink() for p in snapshot.iterdir())
    weights = load_file(snapshot / "model.safetensors")
    for name, tensor in load_file(tiny_ckpt / "model.safetensors").items():
        assert torch.equal(weights[name], tensor)
    assert json.loads((snapshot / "config.json").read_text())["model_type"] == "qwen2_5_vl"
