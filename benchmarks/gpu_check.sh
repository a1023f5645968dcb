#!/usr/bin/env bash
# GPU checks in one short run: FlashAttention-2 + bf16 capture equality (the `gpu`-marked tests) and the
# attention-overhead benchmark on CUDA. Writes everything under OUT (default runs/gpu_check).
#
#   PYTHON=/path/to/cuda/env/bin/python bash benchmarks/gpu_check.sh [OUT]
#
# PYTHON must have a CUDA build of torch (and flash-attn for the FlashAttention-2 test, which is skipped without
# it) plus this package installed. Without CUDA the script still runs end to end on CPU at a toy size
# (`GPU_CHECK_CPU=1` forces it), which is how it is tested on the CPU-only development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"

if [[ ${GPU_CHECK_CPU:-0} != 1 ]] && "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  device=cuda; dtype=bfloat16; lengths=(4096 8192 16384); repeats=5
else
  device=cpu; dtype=float32; lengths=(512); repeats=2
  echo "no CUDA device: toy CPU run (checks the script, measures nothing useful)" >&2
fi

"$python" - <<'EOF' | tee "$out/environment.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
try:
    import flash_attn
    print("flash_attn", flash_attn.__version__)
except ImportError:
    print("flash_attn not installed: the FlashAttention-2 test will be skipped")
EOF

# 1. capture equality under FlashAttention-2 + bf16 (skipped without CUDA / flash-attn), plus the CPU capture suite
"$python" -m pytest -q -rs tests/test_capture.py 2>&1 | tee "$out/capture_tests.txt"

# 2. overhead: plain SFT vs ours vs the official capture pattern, with and without activation checkpointing
"$python" benchmarks/attention_overhead.py --device "$device" --dtype "$dtype" --lengths "${lengths[@]}" --repeats "$repeats" \
  --json "$out/overhead.json" 2>&1 | tee "$out/overhead.txt"
"$python" benchmarks/attention_overhead.py --device "$device" --dtype "$dtype" --lengths "${lengths[@]}" --repeats "$repeats" \
  --methods plain swim --checkpointing --json "$out/overhead_checkpointing.json" 2>&1 | tee "$out/overhead_checkpointing.txt"
echo "gpu_check: results in $out"
