"""Data and inputs: datasets and their specs (`datasets`), the shipped reference domains and SAE
(`embedded`), how records become model inputs (`inputs`), and which reference records a score
reads versus which the ground truth measures (`references`).
"""
