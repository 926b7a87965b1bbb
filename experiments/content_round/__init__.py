"""Issue 53: the content round (PREREGISTRATION.md in docs/results/content-round)."""
