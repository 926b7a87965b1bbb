"""docs/results/demo: its scripts (see the folder's report)."""
