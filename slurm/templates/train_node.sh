#!/bin/bash
# sspeft training, one srun task per node: torchrun for this node's ranks. Rendered by `python -m slurm.submit`.
# Runs on every node of the allocation, so the node index below is this node's own (SLURM_PROCID of a task
# that is alone on its node), resolved here at run time.
set -euo pipefail

node_index=$SLURM_PROCID
echo "sspeft: node $(hostname) (index $node_index of @@NODES@@) joining rendezvous $SSPEFT_RDZV_ENDPOINT"

# c10d rendezvous on the first node: every node's torchrun meets there, the node ranks are assigned at
# rendezvous, and join_timeout bounds the wait for a node that never arrives. torchrun forwards only the
# signals named in --signals-to-handle to the ranks, so the preemption signal is listed there.
exec @@PYTHON@@ -m torch.distributed.run \
    --nnodes=@@NODES@@ \
    --nproc-per-node=@@PROCS@@ \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$SSPEFT_RDZV_ENDPOINT" \
    --rdzv-id="$SSPEFT_RDZV_ID" \
    --rdzv-conf=join_timeout=@@JOIN_TIMEOUT@@ \
    --max-restarts=0 \
    --signals-to-handle=@@HANDLED_SIGNALS@@ \
    --shutdown-timeout=@@SHUTDOWN_TIMEOUT@@ \
    -m slurm.rank "$SSPEFT_RANK_STATUS_DIR" -- @@COMMAND@@
