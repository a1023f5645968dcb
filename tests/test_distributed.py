"""Multi-process training through `swim train` itself: 2 CPU ranks (gloo), mixed batches on every step.

The record file alternates captions (masks: attention-supervised) and QA records (no masks with `supervise_qa:
false`); with sequential sampling and per-device batch 1, rank 0 gets every caption and rank 1 every QA record, so
every step mixes a supervised and an unsupervised rank — the paper mixture's normal case, which used to hang DDP
and abort ZeRO-3 at step 0. Each back-end runs 3-4 SGD steps and must equal a single-process run with gradient
accumulation 2 (the same micro-batches) to ~1e-5 of the update; every launch runs under a hard timeout so that a
hang fails the test instead of stalling CI.

The multi-process runs start from the paper's hub name (`Qwen/Qwen2.5-VL-7B-Instruct`, served from an offline hub
cache by the tiny checkpoint), as a user's run does, and every folder they write — the final one and each
`checkpoint-N` — must be a stock checkpoint (`checkpoint_checks.assert_stock_checkpoint`: the stock tensor names, a
vLLM-style loader finds every tensor, `AutoProcessor` + the stock class process a video and generate).
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from checkpoint_checks import HUB_NAME, assert_stock_checkpoint, hub_environment
from safetensors.torch import load_file

from swim.data.synth.shapes import SynthConfig, generate
from swim.modeling.model import stock_model_class
from swim.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo_cpu.yaml"
SEG_RECIPE = ROOT / "recipes" / "seg_demo_cpu.yaml"
ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"
ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"
SAVES = (
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--save_total_limit",
    "2",
)  # checkpoint-2 (+ -4) and final
# seconds per launch; a first ZeRO-3 run on a fresh machine JIT-builds DeepSpeed's CPU comm op (~30 s)
LAUNCH_TIMEOUT = int(os.environ.get("SWIM_TEST_LAUNCH_TIMEOUT", "240"))
TOLERANCE = 1e-5  # of the update's norm


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("mixed")
    files = generate(out, SynthConfig(qa_fraction=0.5), seed=0, counts={"train": 16, "val": 0})
    records = json.loads(Path(files["train"]).read_text())
    captions = [r for r in records if "_caption_" in r["index"]]
    questions = [r for r in records if "_qa_" in r["index"]]
    assert len(captions) >= 4 and len(questions) >= 4
    alternating = [r for pair in zip(captions, questions) for r in pair]
    (out / "mixed.json").write_text(json.dumps(alternating))
    return out / "mixed.json"


def swim_args(ckpt, data, out_dir, steps, *extra, recipe=RECIPE):
    return ["--config", str(recipe), "--model_name_or_path", str(ckpt), "--data_config", str(data),
            "--output_dir", str(out_dir), "--per_device_train_batch_size", "1", "--max_steps", str(steps),
            "--train_sampling_strategy", "sequential", "--supervise_qa", "false", "--cache_samples", "false",
            "--optim", "sgd", "--learning_rate", "0.1", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
            "--weight_decay", "0", "--max_grad_norm", "0", "--logging_steps", "1", "--save_strategy", "no",
            *extra]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, hub_cache=None) -> str:
    """`torchrun -m swim.train ARGS` on `nproc` CPU ranks; the whole process group is killed after the timeout.
    With `hub_cache`, hub names resolve from that offline cache."""
    return launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), "-m", "swim.train", *args, "--ddp_timeout", "60"],
                  nproc, hub_cache)  # fmt: skip


def launch(cmd, nproc=2, hub_cache=None) -> str:
    base = hub_environment(hub_cache) if hub_cache else os.environ
    env = {k: v for k, v in base.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # torchrun, swim, python
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        output, _ = proc.communicate()
        pytest.fail(f"{nproc}-rank run hung: killed after {LAUNCH_TIMEOUT} s\n{output[-3000:]}")
    assert proc.returncode == 0, output[-5000:]
    return output


def kill_tree(pid: int) -> None:
    """Kill a launcher and every worker under it (torchrun's workers are not in its process group)."""
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def logged(out_dir) -> list[tuple]:
    history = json.loads((Path(out_dir) / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e["loss"], e["loss_text"], e.get("loss_attn")) for e in history if "loss" in e]


def assert_same_logs(run, reference):
    assert len(run) == len(reference)
    for row, expected in zip(run, reference):
        assert row == pytest.approx(expected, rel=1e-5)


def stock_weights(path) -> dict[str, torch.Tensor]:
    """The checkpoint as the stock class loads it; it must load with no missing or unexpected keys."""
    model, info = stock_model_class(path).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return {k: v.float() for k, v in model.state_dict().items()}


def relative_difference(weights, reference, start) -> float:
    """‖w − w_ref‖ / ‖w_ref − w_0‖: the error relative to the size of the update."""
    error = sum(((weights[k] - reference[k]) ** 2).sum() for k in reference)
    update = sum(((reference[k] - start[k]) ** 2).sum() for k in reference)
    return float((error / update).sqrt())


def assert_same_run(out_dir, reference_dir, start):
    assert_same_logs(logged(out_dir), logged(reference_dir))
    assert relative_difference(stock_weights(out_dir), stock_weights(reference_dir), start) < TOLERANCE


def assert_stock_folders(out_dir, checkpoints=("checkpoint-2",)):
    """The final folder (processed a video and generated) and each intermediate one are stock checkpoints."""
    assert_stock_checkpoint(out_dir)
    for name in checkpoints:
        assert_stock_checkpoint(Path(out_dir) / name, generate=False)


@pytest.fixture(scope="module")
def start(tiny_ckpt):
    return stock_weights(tiny_ckpt)


@pytest.fixture(scope="module")
def reference(tiny_ckpt, mixed, tmp_path_factory):
    """One process, accumulation 2: micro-batches (rec0, rec1), (rec2, rec3), ... exactly what the two ranks see."""
    runs = {}
    for name, steps, extra in (("mixed", 4, ()), ("supervised", 3, ("--supervise_qa", "true"))):
        out = tmp_path_factory.mktemp(f"reference_{name}")
        train_main(swim_args(tiny_ckpt, mixed, out, steps, "--gradient_accumulation_steps", "2", *extra))
        runs[name] = out
    assert all(attn is not None for *_, attn in logged(runs["mixed"]))  # every step has a supervised sample
    return runs


def test_ddp_with_mixed_batches_equals_one_process(hub_cache, mixed, reference, start, tmp_path):
    output = torchrun(
        swim_args(HUB_NAME, mixed, tmp_path / "ddp", 4, "--use_cpu", "true", *SAVES), hub_cache=hub_cache
    )
    assert "trained with DDP over 2 processes" in output
    assert_same_run(tmp_path / "ddp", reference["mixed"], start)
    assert_stock_folders(tmp_path / "ddp", ("checkpoint-2", "checkpoint-4"))


def test_zero3_with_mixed_batches_equals_one_process_and_resumes(
    hub_cache, mixed, reference, start, tmp_path
):
    zero3 = ("--deepspeed", str(ZERO3), *SAVES)
    output = torchrun(swim_args(HUB_NAME, mixed, tmp_path / "z3", 4, *zero3), hub_cache=hub_cache)
    assert "trained with DeepSpeed ZeRO stage 3 over 2 processes" in output
    assert_same_run(tmp_path / "z3", reference["mixed"], start)
    assert_stock_folders(
        tmp_path / "z3", ("checkpoint-2", "checkpoint-4")
    )  # was: 50 tensors under model.model.*
    # interrupted after the step-2 checkpoint, resumed on 2 ranks: the same losses and weights
    torchrun(swim_args(HUB_NAME, mixed, tmp_path / "resumed", 4, *zero3, "--save_strategy", "no",
                       "--resume_from_checkpoint", str(tmp_path / "z3" / "checkpoint-2")), hub_cache=hub_cache)  # fmt: skip
    assert [s for s, *_ in logged(tmp_path / "resumed")] == [1, 2, 3, 4]
    assert_same_run(tmp_path / "resumed", reference["mixed"], start)


def test_zero2_with_mixed_batches_equals_one_process(hub_cache, mixed, reference, start, tmp_path):
    output = torchrun(swim_args(HUB_NAME, mixed, tmp_path / "z2", 4, "--deepspeed", str(ZERO2), *SAVES),
                      hub_cache=hub_cache)  # fmt: skip
    assert "trained with DeepSpeed ZeRO stage 2 over 2 processes" in output
    assert_same_run(tmp_path / "z2", reference["mixed"], start)
    assert_stock_folders(tmp_path / "z2", ("checkpoint-2", "checkpoint-4"))


def test_fsdp2_with_mixed_batches_equals_one_process(hub_cache, mixed, reference, start, tmp_path):
    """Through the cluster launcher's `--fsdp2` switch (configs/fsdp/fsdp2.json), on 2 CPU ranks."""
    recipe_args = swim_args(HUB_NAME, mixed, tmp_path / "fsdp", 4, *SAVES)
    assert recipe_args[:2] == ["--config", str(RECIPE)]
    output = launch(["bash", "run_scripts/run_sft.sh", "--recipe", str(RECIPE), "--fsdp2", "--gpus-per-node", "2",
                     "--master-port", str(free_port()), "--", *recipe_args[2:], "--ddp_timeout", "60"],
                    hub_cache=hub_cache)  # fmt: skip
    assert "trained with FSDP2 over 2 processes (parameters sharded as DTensor)" in output
    assert_same_run(tmp_path / "fsdp", reference["mixed"], start)
    assert_stock_folders(tmp_path / "fsdp", ("checkpoint-2", "checkpoint-4"))


def test_zero3_fully_supervised_control(tiny_ckpt, mixed, reference, start, tmp_path):
    output = torchrun(swim_args(tiny_ckpt, mixed, tmp_path / "z3", 3, "--supervise_qa", "true",
                                "--deepspeed", str(ZERO3)))  # fmt: skip
    assert "ZeRO stage 3 over 2 processes" in output
    assert_same_run(tmp_path / "z3", reference["supervised"], start)


def test_one_step_does_not_depend_on_the_batch_layout(tiny_ckpt, mixed, start, tmp_path):
    """1 process x batch 2 == 1 process x batch 1 x accumulation 2 == 2 processes x batch 1 (one sample has masks)."""
    layouts = {
        "batch2": ["--per_device_train_batch_size", "2"],
        "accumulate2": ["--gradient_accumulation_steps", "2"],
    }
    for name, extra in layouts.items():
        train_main(swim_args(tiny_ckpt, mixed, tmp_path / name, 1, *extra))
    torchrun(swim_args(tiny_ckpt, mixed, tmp_path / "ranks2", 1, "--use_cpu", "true"))
    reference = stock_weights(tmp_path / "batch2")
    (step, loss, text, attn), *_ = logged(tmp_path / "batch2")
    assert attn > 0 and loss == pytest.approx(text + attn, rel=1e-6)  # λ = 1 on the step's pair mean
    for name in ("accumulate2", "ranks2"):
        assert_same_logs(logged(tmp_path / name), logged(tmp_path / "batch2"))
        assert relative_difference(stock_weights(tmp_path / name), reference, start) < TOLERANCE, name
    # the tolerance is meaningful: without the attention loss the same step lands elsewhere
    train_main(swim_args(tiny_ckpt, mixed, tmp_path / "text_only", 1, "--per_device_train_batch_size", "2",
                         "--attn_weight", "0"))  # fmt: skip
    assert relative_difference(stock_weights(tmp_path / "text_only"), reference, start) > 1e-3


def test_zero3_with_mixed_batches_on_qwen3_vl(tiny_checkpoints, mixed, tmp_path):
    """The same check for another family: Qwen3-VL (per-head q/k norms, timestamped video blocks, DeepStack)."""
    ckpt = tiny_checkpoints("qwen3_vl")
    train_main(swim_args(ckpt, mixed, tmp_path / "reference", 3, "--gradient_accumulation_steps", "2"))
    output = torchrun(swim_args(ckpt, mixed, tmp_path / "z3", 3, "--deepspeed", str(ZERO3)))
    assert "ZeRO stage 3 over 2 processes" in output
    start = stock_weights(ckpt)
    assert all(attn is not None for *_, attn in logged(tmp_path / "reference"))
    assert_same_run(tmp_path / "z3", tmp_path / "reference", start)


# ---- with the segmentation head (swim.seg): rank 1's batches have no masks, so it runs the head on a zero-weighted
# dummy; both ranks must still issue the same collectives and the run must equal one process with accumulation 2.


@pytest.fixture(scope="module")
def seg_reference(tiny_ckpt, mixed, tmp_path_factory):
    from swim.seg.sam2 import build_tiny_sam2

    sam = build_tiny_sam2(tmp_path_factory.mktemp("sam2") / "tiny_sam2", hidden=32)
    SEG_START["sam"] = {f"sam.{k}": v for k, v in load_file(sam / "model.safetensors").items()}
    extra = ("--seg_sam", str(sam), "--mba_mode", "fixed", "--mba_prior", "swim_attn", "--mba_heads", "4",
             "--mba_dropout", "0", "--mba_warmup_ratio", "0", "--aux_warmup_ratio", "0")  # fmt: skip
    out = tmp_path_factory.mktemp("reference_seg")
    train_main(
        swim_args(tiny_ckpt, mixed, out, 3, "--gradient_accumulation_steps", "2", *extra, recipe=SEG_RECIPE)
    )
    return out, extra


def seg_logged(out_dir) -> list[tuple]:
    history = json.loads((Path(out_dir) / "trainer_state.json").read_text())["log_history"]
    keys = ("loss", "loss_text", "loss_attn", "loss_mask", "loss_dice", "loss_bound", "mba_gamma")
    return [tuple(e.get(k) for k in keys) for e in history if "loss" in e]


SEG_START: dict[str, dict] = {}
# SAM-2's encoder gradients (convolutions, interpolated position embeddings) sum many terms: the in-process
# reference and the torchrun workers (one thread each) differ by ~2e-5 of the update there.
HEAD_TOLERANCE = 1e-4


def assert_same_seg_run(out_dir, reference_dir, start):
    from swim.seg.head import SegHead

    run, ref = seg_logged(out_dir), seg_logged(reference_dir)
    assert len(run) == len(ref) == 3 and all(row[3] is not None for row in ref)
    for row, expected in zip(run, ref):
        assert row == pytest.approx(expected, rel=1e-5)
    assert relative_difference(stock_weights(out_dir), stock_weights(reference_dir), start) < TOLERANCE
    assert_stock_checkpoint(out_dir, generate=False)  # the LLM folder beside seg_head/ is a stock checkpoint
    heads = [SegHead.from_pretrained(Path(d) / "seg_head").state_dict() for d in (out_dir, reference_dir)]
    sam_start = SEG_START["sam"]
    assert relative_difference(*(
        {k: h[k] for k in sam_start} for h in heads), sam_start) < HEAD_TOLERANCE  # fmt: skip
    for name, value in heads[1].items():  # projection and MBA
        if name not in sam_start:
            torch.testing.assert_close(heads[0][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_ddp_with_the_segmentation_head_and_mixed_batches(tiny_ckpt, mixed, seg_reference, start, tmp_path):
    reference, extra = seg_reference
    args = swim_args(tiny_ckpt, mixed, tmp_path / "ddp", 3, "--use_cpu", "true", *extra, recipe=SEG_RECIPE)
    output = torchrun(args)
    assert "trained with DDP over 2 processes" in output
    assert_same_seg_run(tmp_path / "ddp", reference, start)


def test_zero3_with_the_segmentation_head_and_mixed_batches(tiny_ckpt, mixed, seg_reference, start, tmp_path):
    reference, extra = seg_reference
    output = torchrun(swim_args(tiny_ckpt, mixed, tmp_path / "z3", 3, "--deepspeed", str(ZERO3), *extra,
                                recipe=SEG_RECIPE))  # fmt: skip
    assert "trained with DeepSpeed ZeRO stage 3 over 2 processes" in output
    assert_same_seg_run(tmp_path / "z3", reference, start)
