"""docs/results/transfer/explore: its scripts (see the folder's report)."""
