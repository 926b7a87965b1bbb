"""Issue 53: how well each measured truth reproduces itself (split-half ceilings)."""
