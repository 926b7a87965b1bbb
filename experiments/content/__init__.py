"""docs/results/content: its scripts (see the folder's report)."""
