"""docs/results/explain: its scripts (see the folder's report)."""
