"""Scores: the registry of scores (each a `ScoreSpec` with its `Kind`: what it reads and how it
scores) and the formulas over shifted SAE features, residuals, texts and gradients (`score`).
"""
