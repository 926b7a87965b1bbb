"""docs/results/plain: its scripts (see the folder's report)."""
