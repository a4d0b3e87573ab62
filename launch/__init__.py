"""Training-stage applications: `launch.train` (recipe → adapter), `launch.merge` (→ plain checkpoint),
`launch.demo` (the embedded default end to end). Run-directory paths live in `launch.rundir`, the recipe schema in
`launch.recipe`."""

from launch.threads import default_wait_policy

default_wait_policy()  # before any stage imports torch: the OpenMP runtime reads it once (launch/threads.py)
