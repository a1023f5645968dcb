#!/usr/bin/env bash
# lmms-eval's stock `qwen2_5_vl` model on a swim checkpoint: the general video benchmarks (MVBench, VideoMME,
# ActivityNetQA) and the tasks shipped in lmms_tasks/ (VideoRefer-Bench-Q from local files, the synthetic smoke
# task). A swim checkpoint is an ordinary Qwen2.5-VL checkpoint, so no custom model code is involved.
#
#   bash run_scripts/eval_lmms.sh CKPT OUT_DIR [NUM_GPUS] [TASKS]
#   bash run_scripts/eval_lmms.sh output/swim-7b out/lmms 8 mvbench,videomme,activitynetqa
#   VIDEOREFER_BENCH_Q=data/NL-Refer/bench VIDEOREFER_BENCH_Q_VIDEOS=data/VideoRefer-Bench \
#     bash run_scripts/eval_lmms.sh output/swim-7b out/lmms 8 mvbench,videorefer_bench_q_nl
#   DEVICE=cpu LIMIT=5 bash run_scripts/eval_lmms.sh runs/tiny-ckpt out/lmms 1 swim_synth_bench_q
#
# Which Python: $LMMS_PYTHON if set, else .venv-lmms/bin/python when it exists (`make lmms-setup`), else the
# active `python`. lmms-eval is an optional extra, best in that separate venv: 0.7.x pins av<16, adds ~850 MB and
# needs torchvision, qwen-vl-utils and decord (docs/lmms_eval.md). The benchmarks come from the Hugging Face Hub
# into $HF_HOME; ActivityNetQA is scored by a GPT judge inside lmms-eval (OPENAI_API_KEY, and OPENAI_API_URL, the
# full chat-completions URL, for another endpoint).
#
# Environment:
#   DEVICE            unset: lmms-eval's defaults (device=cuda, device_map=auto; one process per GPU through
#                     accelerate). cpu: device=cpu,device_map=cpu, one plain process, sdpa attention. Any other
#                     value X (cuda:1, ...): device=X,device_map=X.
#   ATTN              flash_attention_2 | sdpa | eager. Default: flash_attention_2 when flash-attn imports in that
#                     Python, else sdpa (said on stderr). SWIM's README passes use_flash_attention_2=true, which
#                     current lmms-eval rejects.
#   MAX_NUM_FRAMES, MIN_PIXELS, MAX_PIXELS
#                     frame count and per-frame pixel bounds. Not passed by default, so lmms-eval's defaults apply
#                     (32 frames, 256*28*28 .. 1605632 pixels), as in SWIM's own lmms-eval command
#                     (docs/official_release.md §5.3); e.g. the training settings: MAX_NUM_FRAMES=32
#                     MIN_PIXELS=100352 MAX_PIXELS=602112.
#   EXTRA_MODEL_ARGS  more key=value model arguments, comma-separated, appended last (so they win over the ones
#                     above). lmms_eval/models/simple/qwen2_5_vl.py rejects unknown ones; valid: pretrained, device,
#                     device_map, attn_implementation, max_num_frames, min_pixels, max_pixels, fps, system_prompt
#                     (split at commas: SWIM's system prompt cannot be passed), interleave_visuals, ...
#   INCLUDE_PATH      folder of extra lmms-eval task YAMLs (--include_path). Default: this repository's lmms_tasks/;
#                     set it empty for none.
#   LIMIT             --limit: the first N documents of each task (a fraction if < 1). For smoke tests only.
#   LMMS_EVAL_ARGS    more lmms-eval command-line arguments, split at spaces (e.g. "--force_simple --verbosity DEBUG").
#   PORT              accelerate's main process port (default 29500).
#
# Exit status: lmms-eval's own when it fails; lmms-eval catches errors inside an evaluation and still exits 0,
# so this script then exits 1 unless a results file written by this run (OUT_DIR/<model>/<date>_results.json)
# holds every requested task (a task, group or tag name; shell patterns such as mvbench_* match any).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USAGE="usage: eval_lmms.sh CKPT OUT_DIR [NUM_GPUS] [TASKS]"
die() {
  echo "eval_lmms.sh: $*" >&2
  exit 1
}

CKPT=${1:?$USAGE}
OUT=${2:?$USAGE}
DEVICE=${DEVICE:-}
if [[ -n ${3:-} ]]; then
  NUM_GPUS=$3
elif [[ $DEVICE == cpu ]]; then
  NUM_GPUS=1
else
  NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  if ((NUM_GPUS == 0)) && [[ -z $DEVICE ]]; then
    echo "eval_lmms.sh: warning: nvidia-smi lists no GPU; lmms-eval will try CUDA (set DEVICE=cpu for the CPU)" >&2
  fi
fi
[[ $NUM_GPUS =~ ^[0-9]+$ ]] || die "NUM_GPUS must be a whole number, got '$NUM_GPUS'"
NUM_GPUS=$((NUM_GPUS > 0 ? NUM_GPUS : 1))
TASKS=${4:-mvbench,videomme,activitynetqa}
if [[ $DEVICE == cpu && $NUM_GPUS -gt 1 ]]; then
  die "DEVICE=cpu runs one process (lmms-eval's qwen2_5_vl puts every further process on cuda:RANK); got NUM_GPUS=$NUM_GPUS"
fi

# ---- the Python that runs lmms-eval
if [[ -n ${LMMS_PYTHON:-} ]]; then
  PY=$LMMS_PYTHON
elif [[ -x $ROOT/.venv-lmms/bin/python ]]; then
  PY=$ROOT/.venv-lmms/bin/python
else
  PY=$(command -v python || command -v python3 || true)
  [[ -n $PY ]] || die "no python on PATH; run 'make lmms-setup' (creates .venv-lmms) or set LMMS_PYTHON"
fi
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("lmms_eval") is None)' ||
  die "lmms-eval is not installed for $PY: run 'make lmms-setup' (creates .venv-lmms) or set LMMS_PYTHON"
echo "eval_lmms.sh: lmms-eval from $PY" >&2

# ---- model arguments
if [[ -z ${ATTN:-} ]]; then
  if [[ $DEVICE == cpu ]]; then
    ATTN=sdpa
    echo "eval_lmms.sh: DEVICE=cpu: using attn_implementation=sdpa (flash-attn needs CUDA)" >&2
  elif "$PY" -c 'import flash_attn' >/dev/null 2>&1; then
    ATTN=flash_attention_2
  else
    ATTN=sdpa
    echo "eval_lmms.sh: flash-attn is not importable by $PY: using attn_implementation=sdpa" \
      "(install flash-attn for flash_attention_2, or set ATTN)" >&2
  fi
fi
case $ATTN in
  flash_attention_2 | sdpa | eager) ;;
  *) die "ATTN must be flash_attention_2, sdpa or eager, got '$ATTN'" ;;
esac

MODEL_ARGS="pretrained=$CKPT,attn_implementation=$ATTN"
if [[ $DEVICE == cpu ]]; then
  MODEL_ARGS+=",device=cpu,device_map=cpu"
elif [[ -n $DEVICE ]]; then
  MODEL_ARGS+=",device=$DEVICE,device_map=$DEVICE"
fi
if [[ -n ${MAX_NUM_FRAMES:-} ]]; then MODEL_ARGS+=",max_num_frames=$MAX_NUM_FRAMES"; fi
if [[ -n ${MIN_PIXELS:-} ]]; then MODEL_ARGS+=",min_pixels=$MIN_PIXELS"; fi
if [[ -n ${MAX_PIXELS:-} ]]; then MODEL_ARGS+=",max_pixels=$MAX_PIXELS"; fi
EXTRA_MODEL_ARGS=${EXTRA_MODEL_ARGS:-}
EXTRA_MODEL_ARGS=${EXTRA_MODEL_ARGS#,}
if [[ -n $EXTRA_MODEL_ARGS ]]; then MODEL_ARGS+=",$EXTRA_MODEL_ARGS"; fi

# ---- lmms-eval arguments
ARGS=(--model qwen2_5_vl --model_args "$MODEL_ARGS" --tasks "$TASKS" --batch_size 1
  --log_samples --log_samples_suffix swim --output_path "$OUT")
INCLUDE_PATH=${INCLUDE_PATH-$ROOT/lmms_tasks}
if [[ -n $INCLUDE_PATH ]]; then
  [[ -d $INCLUDE_PATH ]] || die "INCLUDE_PATH=$INCLUDE_PATH: no such folder"
  ARGS+=(--include_path "$(cd "$INCLUDE_PATH" && pwd)")
fi
if [[ -n ${LIMIT:-} ]]; then ARGS+=(--limit "$LIMIT"); fi
if [[ -n ${LMMS_EVAL_ARGS:-} ]]; then
  read -r -a extra <<<"$LMMS_EVAL_ARGS"
  ARGS+=("${extra[@]}")
fi

if [[ $TASKS == *activitynetqa* && -z ${OPENAI_API_KEY:-} ]]; then
  echo "eval_lmms.sh: warning: activitynetqa is scored by a GPT judge and needs OPENAI_API_KEY" >&2
fi
# qwen-vl-utils picks torchcodec when it is installed, which fails to read videos here; decord is installed with
# lmms-eval's qwen2_5_vl anyway (it imports it unconditionally)
export FORCE_QWENVL_VIDEO_READER=${FORCE_QWENVL_VIDEO_READER:-decord}

if [[ $DEVICE == cpu ]]; then
  LAUNCH=("$PY" -m lmms_eval)
else
  # one process per GPU (data parallel); batch size 1 as in the official runs; --log_samples keeps every answer
  LAUNCH=("$PY" -m accelerate.commands.launch --num_processes "$NUM_GPUS" --main_process_port "${PORT:-29500}"
    -m lmms_eval)
fi

mkdir -p "$OUT"
list_results() { find "$OUT" -type f -name '*_results.json' -printf '%p\t%T@\n' | sort; }
BEFORE=$(list_results)
echo "eval_lmms.sh: ${LAUNCH[*]} ${ARGS[*]}" >&2
rc=0
"${LAUNCH[@]}" "${ARGS[@]}" || rc=$?
if ((rc != 0)); then
  die "lmms-eval failed with exit status $rc"
fi

# ---- lmms-eval exits 0 after failures it caught: only a results file of this run with every task counts
mapfile -t NEW < <(comm -13 <(printf '%s\n' "$BEFORE") <(list_results) | cut -f1 | grep -v '^$' || true)
if ((${#NEW[@]} == 0)); then
  die "lmms-eval exited 0 but wrote no results file under $OUT (it catches errors and exits 0: see its log above)"
fi
"$PY" - "$TASKS" "${NEW[@]}" <<'EOF' || exit 1
import fnmatch
import json
import sys

requested = [t.strip() for t in sys.argv[1].split(",") if t.strip()]
found = {}  # task / group / tag name -> its metrics
for path in sys.argv[2:]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"eval_lmms.sh: {path}: unreadable results file: {e}", file=sys.stderr)
        continue
    for section in ("results", "groups"):
        for name, metrics in (data.get(section) or {}).items():
            found.setdefault(name, metrics)
    for name in data.get("group_subtasks") or {}:
        found.setdefault(name, {})
    for config in (data.get("configs") or {}).values():
        tags = config.get("tag") or []
        for tag in [tags] if isinstance(tags, str) else tags:
            found.setdefault(tag, {})
missing = [t for t in requested if not any(fnmatch.fnmatchcase(name, t) for name in found)]
if missing:
    print(
        f"eval_lmms.sh: the results ({', '.join(sys.argv[2:])}) lack task(s) {', '.join(missing)}; "
        f"they hold {', '.join(sorted(found)) or 'none'}",
        file=sys.stderr,
    )
    sys.exit(1)
for path in sys.argv[2:]:
    print(f"eval_lmms.sh: results: {path}")
for name in sorted(found):
    if any(fnmatch.fnmatchcase(name, t) for t in requested):
        values = {
            k.split(",")[0]: v
            for k, v in found[name].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k
        }
        print(f"eval_lmms.sh: {name}: " + (", ".join(f"{k}={v:g}" for k, v in values.items()) or "(no metrics)"))
EOF
