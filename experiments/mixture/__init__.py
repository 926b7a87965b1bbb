"""docs/results/mixture: its scripts (see the folder's report)."""
