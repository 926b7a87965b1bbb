"""docs/results/heldout: its scripts (see the folder's report)."""
