"""Validation: `sts validate` fine-tunes on each training set, evaluates base and tuned models,
predicts, and correlates predictions with the measured changes (`validate`), in resumable stages
(`stages`).
"""
