"""Issue 54: the selection round (PREREGISTRATION.md in docs/results/select)."""
