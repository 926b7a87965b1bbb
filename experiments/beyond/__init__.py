"""docs/results/beyond: its scripts (see the folder's report)."""
