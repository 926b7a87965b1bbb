"""Prediction: `sts predict` for one set (`predict`: config, cache, extraction, scores), several
sets and mixtures (`compare`), and the report of either (`report`).
"""
