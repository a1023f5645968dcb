"""`swim train` with the segmentation head: off it changes nothing; on it trains every loss, saves a stock LLM folder
plus `seg_head/`, reloads and resumes."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from checkpoint_checks import assert_stock_checkpoint
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from swim.data.synth.shapes import SynthConfig, generate
from swim.seg.head import SegHead
from swim.seg.sam2 import build_tiny_sam2
from swim.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo_cpu.yaml"
SEG_RECIPE = ROOT / "recipes" / "seg_demo_cpu.yaml"
# The last commit before the segmentation head. Move it forward deliberately when the text/attention path changes
# on purpose; until then `seg_head: false` must train exactly as this commit does.
BASELINE_COMMIT = "7c20a85e01e53c19d9a9e2924b6378323bddaf2a"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_train")
    paths = generate(out, SynthConfig(qa_fraction=0.25), seed=0, counts={"train": 8, "val": 0})
    return paths["train"], build_tiny_sam2(out / "tiny_sam2", hidden=32)


def common(ckpt, train, out_dir, *extra):
    return ["--model_name_or_path", str(ckpt), "--data_config", str(train), "--output_dir", str(out_dir),
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--max_steps", "3", "--warmup_steps", "0",
            "--attn_layers", "1", "3", "--save_strategy", "no", *extra]  # fmt: skip


def run_module(pythonpath: Path, args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "swim.train", *args], cwd=pythonpath, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


def baseline_tree(tmp_path: Path) -> Path:
    """The `swim` package of BASELINE_COMMIT, extracted from this repository's history."""
    try:
        blob = subprocess.run(["git", "archive", "--format=tar", BASELINE_COMMIT, "swim"], cwd=ROOT,
                              capture_output=True, check=True, timeout=60).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"the baseline commit is not available in this checkout ({e})")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp_path / "baseline", filter="data")
    return tmp_path / "baseline"


def test_seg_off_trains_bit_identically_to_the_code_before_the_head(tiny_ckpt, data, tmp_path):
    train, _ = data
    args = ["--config", str(RECIPE), *common(tiny_ckpt, train, tmp_path / "OUT")]
    run_module(baseline_tree(tmp_path), [a.replace("OUT", "before") for a in args])
    run_module(ROOT, [a.replace("OUT", "now") for a in args] + ["--seg_head", "false"])
    logs = [
        json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        for name in ("before", "now")
    ]
    losses = [
        [(e["step"], e["loss"], e["loss_text"], e["loss_attn"]) for e in log if "loss" in e] for log in logs
    ]
    assert len(losses[0]) == 3 and all(attn > 0 for *_, attn in losses[0])
    assert losses[0] == losses[1]  # exactly
    before, now = (load_file(tmp_path / name / "model.safetensors") for name in ("before", "now"))
    assert before.keys() == now.keys() and all(torch.equal(before[k], now[k]) for k in before)
    assert not (tmp_path / "now" / "seg_head").exists()


def seg_args(ckpt, data, out_dir, *extra):
    """The segmentation recipe at toy size, with SAM-2's encoder trained (the recipe freezes it) so that every
    trainable path of the head runs."""
    train, sam = data
    return ["--config", str(SEG_RECIPE), *common(ckpt, train, out_dir, "--seg_sam", str(sam), "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "3", "--mba_mode", "fixed",
            "--mba_prior", "swim_attn", "--mba_heads", "4", "--mba_warmup_ratio", "0.25", "--aux_warmup_ratio", "0",
            "--seg_freeze_encoder", "false", *extra)]  # fmt: skip


def seg_logs(trainer):
    keys = ("loss", "loss_text", "loss_attn", "loss_mask", "loss_dice", "loss_tmc", "loss_bound", "mba_gamma")
    return [tuple(e[k] for k in keys) for e in trainer.state.log_history if "loss" in e]


def test_head_on_trains_every_loss_saves_beside_a_stock_llm_and_resumes(tiny_ckpt, data, tmp_path):
    out = tmp_path / "run"
    trainer = train_main(seg_args(tiny_ckpt, data, out))
    logs = seg_logs(trainer)
    assert [len(row) for row in logs] == [8] * 4
    assert all(v > 0 for row in logs for v in row[:7])  # text, attention, BCE, Dice, TMC, boundary
    assert logs[0][7] == 0.0 and logs[-1][7] != 0.0  # γ starts at 0 and moves once its warm-up has begun
    head = trainer.model.seg_head
    # the LLM folder is a stock checkpoint without any head weight
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not any("seg_head" in k for k in load_file(out / "model.safetensors"))
    assert_stock_checkpoint(out)
    assert_stock_checkpoint(out / "checkpoint-2", generate=False)
    # the head reloads with the trained weights (decoder, projection, MBA all moved from their start)
    reloaded = SegHead.from_pretrained(out / "seg_head")
    for name, p in head.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], p, rtol=0, atol=0)
    sam_start = load_file(data[1] / "model.safetensors")
    moved = [k for k in sam_start if not torch.equal(sam_start[k], head.sam.state_dict()[k])]
    assert any(k.startswith("mask_decoder.") for k in moved) and any(
        k.startswith("vision_encoder.") for k in moved
    )
    assert not any(k.startswith("prompt_encoder.") for k in moved)  # frozen (Sa2VA)
    # resume the step-2 checkpoint in a fresh run: the same losses, LLM and head
    resumed = train_main(
        seg_args(tiny_ckpt, data, out, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    )
    for a, b in zip(logs, seg_logs(resumed)):
        assert a == pytest.approx(b, rel=1e-5)
    for name, p in resumed.model.seg_head.state_dict().items():
        torch.testing.assert_close(p, head.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_lora_with_a_seg_token_trains_the_head_and_saves_it_beside_the_adapter(tiny_ckpt, data, tmp_path):
    """PEFT freezes every non-adapter weight when it wraps the model: the head's are trainable again."""
    from transformers import AutoTokenizer

    out = tmp_path / "lora"
    trainer = train_main(seg_args(tiny_ckpt, data, out, "--max_steps", "2", "--save_strategy", "no", "--use_peft",
                                  "--lora_r", "4", "--lora_target_modules", "q_proj", "k_proj", "--seg_query",
                                  "seg_token", "--mba_mode", "code", "--mba_prior", "prepass"))  # fmt: skip
    assert all(e["loss_mask"] > 0 for e in trainer.state.log_history if "loss" in e)
    assert (out / "adapter_config.json").exists() and (out / "seg_head" / "seg_head.json").exists()
    assert "[SEG]" in AutoTokenizer.from_pretrained(out).get_vocab()
    head = SegHead.from_pretrained(out / "seg_head")
    assert head.config.query == "seg_token" and head.config.mba_mode == "code"
    start = load_file(data[1] / "model.safetensors")
    decoder = [k for k in start if k.startswith("mask_decoder.transformer")]
    assert any(not torch.equal(start[k], head.sam.state_dict()[k]) for k in decoder)
    # merged into a stock checkpoint that the evaluation tools load
    from swim.merge_lora import merge_lora

    merged = merge_lora(out, tmp_path / "merged", base=str(tiny_ckpt))
    assert_stock_checkpoint(merged)
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged, output_loading_info=True)
    assert (
        not info["missing_keys"]
        and not info["unexpected_keys"]
        and (merged / "seg_head" / "seg_head.json").exists()
    )
    lora_b = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # the merge is not a no-op
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt)
    layer = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[layer], base.state_dict()[layer])
