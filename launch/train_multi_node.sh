#!/usr/bin/env bash
# Several nodes × N GPUs through the DeepSpeed launcher and a hostfile (one line per node: "host slots=GPUS";
# see launch/hostfile.example). Run it on the first host; it reaches the others over passwordless ssh (pdsh).
#   launch/train_multi_node.sh HOSTFILE RECIPE.yaml [section.key=value ...]
# Every node needs the same checkout, environment and a shared file system for the run directory.
# On Slurm clusters use `python -m slurm.submit RECIPE.yaml` instead (one srun task per node, requeue on preemption).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE RECIPE.yaml [section.key=value ...]" >&2
  exit 2
fi
hostfile=$1; recipe=$2; shift 2
master=${MASTER_ADDR:-$(head -n1 "$hostfile" | awk '{print $1}')}
port=${MASTER_PORT:-29500}
cd "$(dirname "$0")/.."
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "$port" \
  --module launch.train "$recipe" "$@"
