"""docs/results/probes: its scripts (see the folder's report)."""
