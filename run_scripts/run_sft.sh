#!/usr/bin/env bash
# SWIM supervised fine-tuning on one or more nodes of GPUs: torchrun + DeepSpeed ZeRO or FSDP2, everything else
# in the recipe.
#
#   bash run_scripts/run_sft.sh [--recipe recipes/swim_7b.yaml] [--deepspeed zero3_offload|zero3|zero2 | --fsdp2]
#                               [--nnodes N] [--node-rank R] [--master-addr HOST] [--master-port PORT]
#                               [--gpus-per-node 8] [-- --any_recipe_key value ...]
#
# --deepspeed NAME   configs/deepspeed/NAME.json (default zero3_offload)
# --fsdp2            PyTorch FSDP2 instead (configs/fsdp/fsdp2.json: full shard, decoder/vision-block wrapping,
#                    FSDP's own non-reentrant activation checkpointing); the recipe's `deepspeed` key is cleared
# Multi-node: run the same command on every node with its --node-rank (or NNODES / NODE_RANK / MASTER_ADDR /
# MASTER_PORT / GPUS_PER_NODE from the environment, e.g. as set by a scheduler).
set -euo pipefail
cd "$(dirname "$0")/.."

recipe=recipes/swim_7b.yaml
deepspeed=zero3_offload
fsdp2=0
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
gpus_per_node=${GPUS_PER_NODE:-8}

while [[ $# -gt 0 ]]; do
  case $1 in
    --recipe) recipe=$2; shift 2 ;;
    --deepspeed) deepspeed=$2; shift 2 ;;
    --fsdp2) fsdp2=1; shift ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --master-addr) master_addr=$2; shift 2 ;;
    --master-port) master_port=$2; shift 2 ;;
    --gpus-per-node) gpus_per_node=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (recipe overrides go after --)" >&2; exit 2 ;;
  esac
done

if [[ $fsdp2 == 1 ]]; then
  backend=(--deepspeed "" --fsdp --fsdp_config configs/fsdp/fsdp2.json)
else
  ds_config=configs/deepspeed/${deepspeed}.json
  [[ -f $ds_config ]] || { echo "no DeepSpeed config $ds_config" >&2; exit 2; }
  backend=(--deepspeed "$ds_config")
fi

# Check the data before spending GPU hours (prints every bad record; training would skip them anyway).
if [[ $node_rank == 0 ]]; then
  data_config=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data_config'])" "$recipe")
  overrides=("$@")
  for i in "${!overrides[@]}"; do  # a --data_config override is what trains
    [[ ${overrides[$i]} == --data_config ]] && data_config=${overrides[$((i + 1))]}
  done
  swim validate "$data_config" || echo "warning: swim validate found bad records (they will be skipped)" >&2
fi

exec torchrun \
  --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$gpus_per_node" \
  --master_addr "$master_addr" --master_port "$master_port" \
  -m swim.train --config "$recipe" "${backend[@]}" "$@"
