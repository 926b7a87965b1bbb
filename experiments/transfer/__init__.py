"""docs/results/transfer: its scripts (see the folder's report)."""
