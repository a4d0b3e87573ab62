#!/bin/bash
# sspeft @@STAGE@@ stage, rendered by `python -m slurm.submit` from @@RECIPE_COMMENT@@
# Resubmit by hand with: sbatch @@SELF_COMMENT@@
@@SBATCH@@
set -uo pipefail
@@EXPORTS@@
echo "sspeft: @@STAGE@@ job $SLURM_JOB_ID on $SLURM_JOB_NODELIST"
@@COMMAND@@
