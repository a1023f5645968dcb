#!/usr/bin/env bash
# `make test-lmms`: the lmms-eval path end to end, offline, on CPU (a few minutes on 2 cores).
#   1. a tiny random Qwen2.5-VL served as Qwen/Qwen2.5-VL-7B-Instruct from an offline hub cache (swim tiny);
#   2. a handful of synthetic videos and Bench-Q-format questions (swim data synth);
#   3. 2 training steps FROM THE HUB NAME (swim train, main venv), so the output folder must carry everything a
#      loader needs (processor files included);
#   4. run_scripts/eval_lmms.sh with DEVICE=cpu on the shipped task lmms_tasks/swim_bench_q/swim_synth_bench_q.yaml
#      (lmms-eval from .venv-lmms);
#   5. the results file: the task, a numeric accuracy, the expected number of samples.
# Work folder: $TEST_LMMS_DIR (default runs/test-lmms, wiped first).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SWIM=${SWIM:-$ROOT/.venv/bin/swim}
LMMS_PY=$ROOT/.venv-lmms/bin/python
[[ -x $SWIM ]] || { echo "test_lmms.sh: $SWIM missing: run 'make setup'" >&2; exit 1; }
[[ -x $LMMS_PY ]] || { echo "test_lmms.sh: $LMMS_PY missing: run 'make lmms-setup'" >&2; exit 1; }

WORK=${TEST_LMMS_DIR:-$ROOT/runs/test-lmms}
rm -rf "$WORK"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
NUM_Q=5 # one question of each Bench-Q type
HUB_NAME=Qwen/Qwen2.5-VL-7B-Instruct

# offline: every hub name resolves to the tiny checkpoint in this cache, nothing is downloaded
export HF_HUB_CACHE=$WORK/hub HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=$WORK/hf_home LMMS_EVAL_DATASETS_CACHE=$WORK/datasets_cache SWIM_LMMS_VIDEO_CACHE=$WORK/video_cache
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

step() { printf '\n== test-lmms: %s (%ds)\n' "$1" "$SECONDS"; }

step "tiny checkpoint served as $HUB_NAME"
"$SWIM" tiny "$WORK/tiny" --hub-cache "$HF_HUB_CACHE" --repo-id "$HUB_NAME"

step "synthetic videos"
"$SWIM" data synth "$WORK/data" --num-train 8 --num-val 0 --num-bench-q "$NUM_Q" --num-bench-d 0

step "2 training steps from the hub name"
"$SWIM" train --config recipes/demo_cpu.yaml --model_name_or_path "$HUB_NAME" \
  --data_config "$WORK/data/train.json" --output_dir "$WORK/ckpt" --max_steps 2 \
  --per_device_train_batch_size 2 --save_strategy no --logging_steps 1
grep -q "model_name_or_path: $HUB_NAME\$" "$WORK/ckpt/swim_config.yaml" ||
  { echo "test_lmms.sh: $WORK/ckpt/swim_config.yaml: not trained from $HUB_NAME" >&2; exit 1; }

step "lmms-eval through run_scripts/eval_lmms.sh"
# the training budgets (recipes/demo_cpu.yaml: 8 frames of at most 112x112), 16 new tokens: a random model's
# answer is noise, only the path is under test
SWIM_SYNTH_DATA=$WORK/data DEVICE=cpu INCLUDE_PATH=lmms_tasks LIMIT=$NUM_Q \
  MAX_NUM_FRAMES=8 MIN_PIXELS=3136 MAX_PIXELS=12544 LMMS_EVAL_ARGS="--gen_kwargs max_new_tokens=16" \
  bash run_scripts/eval_lmms.sh "$WORK/ckpt" "$WORK/lmms" 1 swim_synth_bench_q 2>&1 | tee "$WORK/eval_lmms.log"

step "results"
"$LMMS_PY" - "$WORK/lmms" "$NUM_Q" <<'EOF'
import importlib.metadata
import json
import math
import sys
from pathlib import Path

out, expected = Path(sys.argv[1]), int(sys.argv[2])
files = sorted(out.glob("*/*_results.json"))
if len(files) != 1:
    sys.exit(f"test_lmms.sh: expected one results file under {out}, found {[str(f) for f in files]}")
data = json.loads(files[0].read_text())
task = "swim_synth_bench_q"
if task not in data.get("results", {}):
    sys.exit(f"test_lmms.sh: {files[0]}: no {task} in results (has {sorted(data.get('results', {}))})")
accuracy = data["results"][task].get("accuracy,none")
if not isinstance(accuracy, (int, float)) or not math.isfinite(accuracy) or not 0 <= accuracy <= 100:
    sys.exit(f"test_lmms.sh: {files[0]}: accuracy,none is {accuracy!r}, not a percentage")
n = data.get("n-samples", {}).get(task, {})
if n.get("effective") != expected or n.get("original") != expected:
    sys.exit(f"test_lmms.sh: {files[0]}: n-samples of {task} is {n}, expected {expected}")
samples = sorted(out.glob(f"*/*_samples_{task}.jsonl"))
lines = samples[0].read_text().splitlines() if samples else []
if len(lines) != expected:
    sys.exit(f"test_lmms.sh: expected {expected} logged samples, found {len(lines)} in {samples}")
first = json.loads(lines[0])["accuracy"]
print(f"test-lmms: {files[0]}")
version = importlib.metadata.version("lmms-eval")
print(f"test-lmms: {task}: accuracy {accuracy:g}% over {expected} questions (lmms-eval {version})")
print(f"test-lmms: first answer {first['raw']!r} -> parsed {first['pred']!r} ({first['parse']}), truth {first['gt']}")
EOF
step "done"
echo "test-lmms: 1 passed, 0 failed"
