"""docs/results/calibration: its scripts (see the folder's report)."""
