"""Multi-process DeepSpeed and FSDP on CPU (gloo): laptop smoke runs and the 2-rank tests, with no extra flag.

transformers 5.23 / accelerate 1.15 assume a GPU for both back-ends, and fail in two different ways without one:
- `--deepspeed` without CUDA: `TrainingArguments` builds accelerate's `PartialState` with no backend, accelerate
  concludes "no distributed training" (1 process) while DeepSpeed initialises gloo with the real world size, and
  DeepSpeed's batch-size check aborts (`train_batch_size is not equal to micro_batch_per_gpu * ...`).
- `--fsdp` without CUDA: accelerate switches to FSDP only from GPU-like distributed types; on `MULTI_CPU` the
  request is *silently ignored* and the model is wrapped in DDP, so a "FSDP test on CPU" would test DDP.

`prepare_cpu_distributed` runs before `TrainingArguments` sets up its devices (`SwimSFTConfig.__post_init__`). When
the process was started by a launcher (torchrun / accelerate: `WORLD_SIZE` is set), no CUDA device exists and
DeepSpeed or FSDP is requested, it creates the gloo process-group state itself and tells `TrainingArguments` to
reuse it (`accelerator_config.use_configured_state`). Anywhere else (GPU nodes, plain single-process runs) it
does nothing.
"""

from __future__ import annotations

import json
import logging
import os

import torch

logger = logging.getLogger(__name__)


def launched_multiprocess() -> bool:
    """True under torchrun / accelerate launch (any world size), which set `WORLD_SIZE` and `RANK`."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def shutdown_distributed() -> None:
    """End a launched run's process group: every rank waits for the others, then destroys it.

    Left to interpreter exit, the group's background threads (gloo, DeepSpeed's comm) can be destroyed while still
    joinable, and a finished run then aborts with "terminate called without an active exception" (a non-zero exit
    status after the checkpoint is written). Only for processes started by a launcher: an in-process caller of
    `swim.train.main` keeps its group.
    """
    if launched_multiprocess() and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def prepare_cpu_distributed(args) -> str | None:
    """Configure accelerate's process state for DeepSpeed or FSDP on CPU. Returns the back-end set up, or None.

    args: the `TrainingArguments` being initialised (before `super().__post_init__`); its `accelerator_config`
    gains `use_configured_state: true`.
    """
    if torch.cuda.is_available() or not launched_multiprocess():
        return None
    if not (args.deepspeed or args.fsdp):
        return None
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if args.deepspeed:
        # Accelerate reads this when it builds the state and again when the Trainer builds the Accelerator.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        state = PartialState(backend="gloo")
        backend = "deepspeed"
    else:
        state = PartialState(cpu=True, backend="gloo")
        # FSDP2's `fully_shard` runs on CPU tensors and gloo; only accelerate's type check stands in the way.
        state.distributed_type = DistributedType.MULTI_GPU
        backend = "fsdp"
    args.accelerator_config = {**_as_dict(args.accelerator_config), "use_configured_state": True}
    logger.info("CPU multi-process run: %s over gloo, %d processes", backend, state.num_processes)
    return backend


def _as_dict(accelerator_config) -> dict:
    if accelerator_config is None:
        return {}
    if isinstance(accelerator_config, dict):
        return dict(accelerator_config)
    if isinstance(accelerator_config, str):
        with open(accelerator_config) as f:
            return json.load(f)
    return {k: v for k, v in vars(accelerator_config).items() if not k.startswith("_")}


def describe_parallelism(trainer) -> str:
    """How `trainer` actually trained, read off the live objects (not the flags): for logs and tests."""
    processes = trainer.accelerator.num_processes
    if trainer.is_deepspeed_enabled:
        return (
            f"DeepSpeed ZeRO stage {trainer.deepspeed.zero_optimization_stage()} over {processes} processes"
        )
    if trainer.is_fsdp_enabled:
        from torch.distributed.tensor import DTensor

        version = trainer.accelerator.state.fsdp_plugin.fsdp_version
        sharded = any(isinstance(p, DTensor) for p in trainer.model.parameters())
        return f"FSDP{version} over {processes} processes" + (
            " (parameters sharded as DTensor)" if sharded else ""
        )
    if processes > 1:
        return f"DDP over {processes} processes ({trainer.accelerator.state.backend})"
    return "a single process"
