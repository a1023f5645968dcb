"""`swim train`: recipe -> data -> model -> trainer -> train -> save; resume; DeepSpeed ZeRO-3 on CPU; runs from the
paper's hub name (an offline hub cache) whose every folder, LoRA merges included, is a stock checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checkpoint_checks import HUB_NAME, assert_stock_checkpoint, hub_environment
from transformers import Qwen2_5_VLForConditionalGeneration

from swim.data.synth.shapes import SynthConfig, generate
from swim.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo_cpu.yaml"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return generate(out, SynthConfig(), seed=0, counts={"train": 8, "val": 4})


def args(tiny_ckpt, synth, out_dir, *extra):
    return ["--config", str(RECIPE), "--model_name_or_path", str(tiny_ckpt), "--data_config", str(synth["train"]),
            "--output_dir", str(out_dir), "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--save_steps", "2", "--save_total_limit", "3", "--max_steps", "4", "--warmup_steps", "0",
            "--attn_layers", "1", "3", *extra]  # fmt: skip


def losses(trainer):
    return [
        (e["step"], e["loss"], e["loss_text"], e["loss_attn"])
        for e in trainer.state.log_history
        if "loss" in e
    ]


def test_train_saves_a_plain_checkpoint_and_the_resolved_config(tiny_ckpt, synth, tmp_path):
    trainer = train_main(args(tiny_ckpt, synth, tmp_path / "run"))
    out = tmp_path / "run"
    config = yaml.safe_load((out / "swim_config.yaml").read_text())
    assert config["SwimSFTConfig"]["attn_layers"] == [1, 3]
    assert config["DataArguments"]["data_config"] == str(synth["train"])
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "Qwen2_5_VLForConditionalGeneration"
    ]
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "trainer_state.json").exists()
    assert all(attn > 0 for *_, attn in losses(trainer))
    assert_stock_checkpoint(out)
    for step in (2, 4):
        assert_stock_checkpoint(out / f"checkpoint-{step}", generate=False)


def run_module(module_args, hub_cache, timeout=400):
    """`python -m ...` in a fresh process that resolves hub names from the offline cache, as a user's run does."""
    proc = subprocess.run([sys.executable, "-m", *module_args], env=hub_environment(hub_cache), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_a_run_from_the_hub_name_writes_stock_folders(hub_cache, synth, tmp_path):
    """Trained from `Qwen/Qwen2.5-VL-7B-Instruct` (no local folder to copy processor files from): the final folder
    and every checkpoint-N hold the processor and load in `AutoProcessor` + the stock class."""
    out = tmp_path / "hub"
    run_module(
        ["swim.train", *args(HUB_NAME, synth, out, "--max_steps", "2", "--save_steps", "1")], hub_cache
    )
    assert_stock_checkpoint(out)
    for step in (1, 2):
        assert_stock_checkpoint(out / f"checkpoint-{step}", generate=False)


def test_lora_from_the_hub_name_merges_into_a_stock_folder(hub_cache, synth, tmp_path):
    out, merged = tmp_path / "lora", tmp_path / "merged"
    run_module(["swim.train", *args(HUB_NAME, synth, out, "--use_peft", "--lora_r", "4", "--lora_target_modules",
                                    "q_proj", "k_proj", "--max_steps", "1", "--save_strategy", "no")], hub_cache)  # fmt: skip
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_NAME
    assert (out / "processor_config.json").exists()  # the adapter folder carries the run's processor too
    run_module(["swim.cli", "merge-lora", str(out), str(merged)], hub_cache)  # the base: the hub name
    assert_stock_checkpoint(merged)


def test_resume_reproduces_the_uninterrupted_loss_sequence(tiny_ckpt, synth, tmp_path):
    full = losses(train_main(args(tiny_ckpt, synth, tmp_path / "full")))
    assert [s for s, *_ in full] == [1, 2, 3, 4]
    # the interrupted run: resume the saved step-2 checkpoint in a fresh run
    resumed = losses(train_main(args(tiny_ckpt, synth, tmp_path / "full", "--resume_from_checkpoint",
                                     str(tmp_path / "full" / "checkpoint-2"))))  # fmt: skip
    # the resumed run's history holds the checkpoint's steps 1-2, then its own steps 3-4
    assert [s for s, *_ in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert a == pytest.approx(b, rel=1e-5)


def test_deepspeed_zero3_two_steps_on_cpu(tiny_ckpt, synth, tmp_path):
    pytest.importorskip("deepspeed")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS="1")  # fmt: skip
    cmd = [sys.executable, "-m", "swim.train",
           *args(tiny_ckpt, synth, tmp_path / "ds", "--max_steps", "2", "--save_strategy", "no",
                 "--use_cpu", "false", "--deepspeed", str(ROOT / "configs" / "deepspeed" / "zero3.json"))]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    state = json.loads((tmp_path / "ds" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss_attn" in e]
    assert [e["step"] for e in logged] == [1, 2] and all(e["loss_attn"] > 0 for e in logged)
    assert "trained with DeepSpeed ZeRO stage 3" in proc.stdout + proc.stderr


def test_lora_through_peft_trains_with_the_attention_loss(tiny_ckpt, synth, tmp_path):
    trainer = train_main(args(tiny_ckpt, synth, tmp_path / "lora", "--use_peft", "--lora_r", "4",
                              "--lora_target_modules", "q_proj", "k_proj", "--max_steps", "2", "--save_strategy", "no",
                              "--learning_rate", "1e-2"))  # fmt: skip
    assert all(attn > 0 for *_, attn in losses(trainer))
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n and "layers.1.self_attn" in n}
    assert lora and all(p.abs().sum() > 0 for p in lora.values())  # lora_B starts at zero
