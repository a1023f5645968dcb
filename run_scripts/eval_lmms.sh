#!/usr/bin/env bash
# General video benchmarks (MVBench, VideoMME, ActivityNetQA) through lmms-eval's stock `qwen2_5_vl` model.
# A swim checkpoint is an ordinary Qwen2.5-VL checkpoint, so no custom model code is involved.
#
#   bash run_scripts/eval_lmms.sh CKPT OUT_DIR [NUM_GPUS] [TASKS]
#   bash run_scripts/eval_lmms.sh output/swim-7b out/lmms 8 mvbench,videomme,activitynetqa
#
# lmms-eval is an optional extra: `pip install -e ".[lmms]"`, better in a separate venv (0.7.x pins av<16,
# adds ~850 MB and needs torchvision, qwen-vl-utils and decord). It downloads the datasets from the Hugging
# Face Hub into $HF_HOME. ActivityNetQA is scored by a GPT judge inside lmms-eval, which reads OPENAI_API_KEY
# (and OPENAI_API_URL, the full chat-completions URL, for another endpoint).
#
# Model arguments (lmms_eval/models/simple/qwen2_5_vl.py; unknown ones are rejected):
#   attn_implementation  flash_attention_2 | sdpa | eager (env ATTN). SWIM's README passes
#                        use_flash_attention_2=true, which current lmms-eval rejects.
#   max_num_frames, min_pixels, max_pixels
#                        frame count and per-frame pixel bounds. NOT passed by default, so lmms-eval's
#                        defaults apply (32 frames, 256*28*28 .. 1605632 pixels), as in SWIM's own lmms-eval
#                        command (reference §4.4). Set MAX_NUM_FRAMES / MIN_PIXELS / MAX_PIXELS to override,
#                        e.g. to the training settings: MAX_NUM_FRAMES=32 MIN_PIXELS=100352 MAX_PIXELS=602112.
#   system_prompt        default "You are a helpful assistant."; values are split at commas, so SWIM's system
#                        prompt (which has commas) cannot be passed this way.
set -euo pipefail

CKPT=${1:?usage: eval_lmms.sh CKPT OUT_DIR [NUM_GPUS] [TASKS]}
OUT=${2:?output folder missing}
NUM_GPUS=${3:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
NUM_GPUS=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
TASKS=${4:-mvbench,videomme,activitynetqa}
ATTN=${ATTN:-flash_attention_2}

MODEL_ARGS="pretrained=$CKPT,attn_implementation=$ATTN"
[[ -n ${MAX_NUM_FRAMES:-} ]] && MODEL_ARGS+=",max_num_frames=$MAX_NUM_FRAMES"
[[ -n ${MIN_PIXELS:-} ]] && MODEL_ARGS+=",min_pixels=$MIN_PIXELS"
[[ -n ${MAX_PIXELS:-} ]] && MODEL_ARGS+=",max_pixels=$MAX_PIXELS"

if ! python -c "import lmms_eval" 2>/dev/null; then
  echo "lmms-eval is not installed: pip install -e '.[lmms]'" >&2
  exit 1
fi
if [[ $TASKS == *activitynetqa* && -z ${OPENAI_API_KEY:-} ]]; then
  echo "warning: activitynetqa is scored by a GPT judge and needs OPENAI_API_KEY" >&2
fi

mkdir -p "$OUT"
# One process per GPU (data parallel); batch size 1 as in the official runs; --log_samples keeps every answer.
accelerate launch --num_processes "$NUM_GPUS" --main_process_port "${PORT:-29500}" -m lmms_eval \
  --model qwen2_5_vl \
  --model_args "$MODEL_ARGS" \
  --tasks "$TASKS" \
  --batch_size 1 \
  --log_samples \
  --log_samples_suffix swim \
  --output_path "$OUT"
