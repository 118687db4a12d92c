#!/usr/bin/env bash
# Multi-node torchrun launch of anchored-sft. Run this same script on every node:
#
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0's address> \
#     examples/launch_multinode.sh examples/llama3_8b_anchored.yaml [key=value ...]
#
# Expected memory per GPU for the example configs: see the header of each YAML (printed again
# by the dry run below). The dry run validates the config for the whole world size and
# creates no process group, so a bad layout fails here in seconds, not after rendezvous.
set -euo pipefail

CONFIG=${1:?usage: launch_multinode.sh CONFIG.yaml [key=value ...]}
shift
NNODES=${NNODES:?set NNODES}
NODE_RANK=${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR (node 0)}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

export WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP comm/compute overlap expects it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if [[ "$NODE_RANK" == 0 ]]; then
  anchored-sft --config "$CONFIG" --dry-run "$@"
fi
unset WORLD_SIZE  # torchrun sets it per process

exec torchrun \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-anchored}" \
  -m anchored_megatron.train --config "$CONFIG" "$@"
