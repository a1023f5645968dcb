#!/usr/bin/env bash
# Attention grounding of the <ins>-tagged words (pointing game, AUC, NSS, mask mass; per layer and fused),
# for any Qwen2.5-VL checkpoint, so that a stock and a fine-tuned model can be compared on the same records.
#
#   bash run_scripts/eval_grounding.sh CKPT DATA_JSON OUT_DIR [DATA_ROOT] [-- EXTRA swim FLAGS]
#
#   bash run_scripts/eval_grounding.sh output/swim-7b data/NL-Refer/bench/refined-VideoRefer-Bench-D.json out/grounding
#   bash run_scripts/eval_grounding.sh Qwen/Qwen2.5-VL-7B-Instruct data/.../refined-VideoRefer-Bench-D.json out/grounding-base
#
# DATA_ROOT defaults to the json's folder. EXTRA flags, e.g. `-- --layers 2 7 12 17 22 27 --query-offset -1`
# (see `swim eval grounding --help`). Results: OUT_DIR/grounding.json.
set -euo pipefail

CKPT=${1:?usage: eval_grounding.sh CKPT DATA_JSON OUT_DIR [DATA_ROOT] [-- FLAGS]}
DATA=${2:?data json missing}
OUT=${3:?output folder missing}
shift 3
ROOT_ARGS=()
if [[ $# -gt 0 && $1 != "--" ]]; then ROOT_ARGS=(--data-root "$1"); shift; fi
[[ $# -gt 0 && $1 == "--" ]] && shift
SWIM=${SWIM:-swim}

mkdir -p "$OUT"
$SWIM eval grounding --model "$CKPT" --data "$DATA" --out "$OUT" "${ROOT_ARGS[@]}" "$@" 2>&1 | tee "$OUT/log.txt"
