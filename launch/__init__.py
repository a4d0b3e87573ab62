"""Training-stage applications: `launch.train` (recipe → adapter), `launch.merge` (→ plain checkpoint),
`launch.demo` (the embedded default end to end). Run-directory paths live in `launch.rundir`, the recipe schema in
`launch.recipe`."""
