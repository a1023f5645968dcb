#!/usr/bin/env bash
# VideoRefer-Bench-Q on one node: one `swim eval bench-q` process per GPU (round-robin shards of the
# questions), then one merge that scores all shards. The merged results are identical to a single-process run.
#
#   bash run_scripts/eval_bench_q.sh CKPT BENCH_JSON DATA_ROOT OUT_DIR [NUM_GPUS] [-- EXTRA swim FLAGS]
#
#   bash run_scripts/eval_bench_q.sh output/swim-7b \
#       data/VideoRefer-Bench-Q/refined-VideoRefer-Bench-Q.json data/VideoRefer-Bench-Q out/bench_q 8
#
# DATA_ROOT is the folder the records' "video" paths are relative to. EXTRA flags go to every process, e.g.
# `-- --batch-size 2 --attn-implementation flash_attention_2` (see `swim eval bench-q --help`; the video flags
# default to the training settings). Rerunning the same command resumes: answered questions are skipped and
# failed ones are retried. Per-shard logs: OUT_DIR/log.shard-N.txt.
set -euo pipefail

CKPT=${1:?usage: eval_bench_q.sh CKPT BENCH_JSON DATA_ROOT OUT_DIR [NUM_GPUS] [-- FLAGS]}
BENCH=${2:?bench json missing}
DATA_ROOT=${3:?data root missing}
OUT=${4:?output folder missing}
shift 4
NUM_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [[ $# -gt 0 && $1 != "--" ]]; then NUM_GPUS=$1; shift; fi
[[ $# -gt 0 && $1 == "--" ]] && shift
EXTRA=("$@")
NUM_GPUS=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
SWIM=${SWIM:-swim}   # e.g. SWIM="python -m swim.cli" without the console script

mkdir -p "$OUT"
COMMON=(--model "$CKPT" --bench "$BENCH" --data-root "$DATA_ROOT" --out "$OUT")

# 1. generate: shard i on GPU i
pids=()
for ((i = 0; i < NUM_GPUS; i++)); do
  CUDA_VISIBLE_DEVICES=$i $SWIM eval bench-q "${COMMON[@]}" --num-shards "$NUM_GPUS" --shard-index "$i" \
    "${EXTRA[@]}" >"$OUT/log.shard-$i.txt" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "shard $i failed: see $OUT/log.shard-$i.txt" >&2; failed=1; }
done
(( failed == 0 )) || { echo "rerun the same command to resume" >&2; exit 1; }

# 2. merge: parse the answers of all shards, write OUT/results.json and OUT/predictions.jsonl
$SWIM eval bench-q --merge --bench "$BENCH" --data-root "$DATA_ROOT" --out "$OUT" "${EXTRA[@]}"
