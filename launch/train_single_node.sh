#!/usr/bin/env bash
# One node × N GPUs through the DeepSpeed launcher (the ZeRO config comes from the recipe's train.deepspeed).
#   launch/train_single_node.sh RECIPE.yaml [NUM_GPUS] [section.key=value ...]
# Exit status 75 means a preemption checkpoint was written: rerun the same command to resume.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 RECIPE.yaml [NUM_GPUS] [section.key=value ...]" >&2
  exit 2
fi
recipe=$1; shift
gpus=${1:-}
if [[ "$gpus" =~ ^[0-9]+$ ]]; then shift; else gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))"); fi
port=${MASTER_PORT:-29500}
cd "$(dirname "$0")/.."
exec deepspeed --num_gpus "$gpus" --master_port "$port" --module launch.train "$recipe" "$@"
