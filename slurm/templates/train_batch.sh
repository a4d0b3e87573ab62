#!/bin/bash
# sspeft training stage, rendered by `python -m slurm.submit` from @@RECIPE_COMMENT@@
# Resubmit by hand with: sbatch @@SELF_COMMENT@@
@@SBATCH@@
#
# One srun task per node; each runs torchrun for that node's ranks (slurm/train_node.sh). Everything
# node-specific (rendezvous host, node index) is looked up while the job runs, never when it is submitted.
# Preemption: Slurm sends SIG@@SIGNAL@@ to this script @@SIGNAL_SECONDS@@ s before the time limit (or an admin
# sends it: scancel -b -s @@SIGNAL@@ JOB); it is forwarded to the ranks, the training stage checkpoints at an
# agreed step and exits @@PREEMPTED@@, and this script requeues the job, which then resumes from that checkpoint.
set -uo pipefail

run_dir=@@RUN_DIR@@
node_script=@@NODE_SCRIPT@@
nodes=@@NODES@@
max_requeues=@@MAX_REQUEUES@@
attempt=${SLURM_RESTART_COUNT:-0}

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
rdzv_port=@@RDZV_PORT@@
export SSPEFT_RDZV_ENDPOINT="$head_node:$rdzv_port"
export SSPEFT_RDZV_ID="$SLURM_JOB_ID-$attempt"
export SSPEFT_RANK_STATUS_DIR="$run_dir/slurm/status/train-$SLURM_JOB_ID-$attempt"
@@EXPORTS@@
rm -rf "$SSPEFT_RANK_STATUS_DIR"
mkdir -p "$SSPEFT_RANK_STATUS_DIR"
echo "sspeft: training job $SLURM_JOB_ID attempt $attempt on $SLURM_JOB_NODELIST, rendezvous $SSPEFT_RDZV_ENDPOINT"

# The srun inherits --ntasks-per-node from the allocation (Slurm 22.05 does not pass --cpus-per-task on to srun, so
# it is repeated here when set); --kill-on-bad-exit ends every node when one fails (a lone survivor would
# otherwise wait at the next collective until the job's time runs out).
srun --ntasks="$nodes" @@SRUN_CPUS@@--kill-on-bad-exit=1 bash "$node_script" &
srun_pid=$!

forward() {
    echo "sspeft: got SIG$1, forwarding it to the ranks"
    kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward @@SIGNAL@@' @@SIGNAL@@
trap 'forward TERM' TERM

# A trapped signal interrupts `wait`; keep waiting until srun itself has ended, then collect its status.
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid"
done
wait "$srun_pid"
srun_status=$?

preempted=0
failed=0
for status_file in "$SSPEFT_RANK_STATUS_DIR"/rank-*.exit; do
    [ -e "$status_file" ] || continue
    case "$(cat "$status_file")" in
        0) ;;
        @@PREEMPTED@@) preempted=1 ;;
        *) failed=1 ;;
    esac
done

if [ "$preempted" = 1 ] && [ "$failed" = 0 ]; then
    if [ "$attempt" -ge "$max_requeues" ]; then
        echo "sspeft: training checkpointed (exit @@PREEMPTED@@) but the job was already requeued $attempt times; not again" >&2
        exit @@PREEMPTED@@
    fi
    echo "sspeft: training checkpointed after a preemption signal (exit @@PREEMPTED@@); requeueing job $SLURM_JOB_ID"
    # Slurm does not requeue a job that reaches its time limit by itself; the requeued job keeps its id, so the
    # later stages keep waiting for it.
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [ "$srun_status" -ne 0 ]; then
    echo "sspeft: training failed (srun exit status $srun_status); rank statuses in $SSPEFT_RANK_STATUS_DIR" >&2
    # Name the node of every rank that failed or vanished (a rank killed with its node leaves no exit status).
    for node_file in "$SSPEFT_RANK_STATUS_DIR"/rank-*.node; do
        [ -e "$node_file" ] || continue
        rank=$(basename "$node_file" .node)
        exit_file="${node_file%.node}.exit"
        if [ ! -e "$exit_file" ]; then
            echo "sspeft: $rank on node $(cat "$node_file") left no exit status: killed, or its node died" >&2
        elif [ "$(cat "$exit_file")" != 0 ]; then
            echo "sspeft: $rank on node $(cat "$node_file") exited $(cat "$exit_file")" >&2
        fi
    done
fi
exit "$srun_status"
