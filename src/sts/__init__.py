"""sts: predict cross-domain transfer of fine-tuning from shifted SAE features (STS).

The Python API (for notebooks) is the stages the CLI runs, importable from here:

    from sts import PredictConfig, predict
    pred = predict(PredictConfig(train="my_sft.jsonl", score="act"),
                   model=model, tokenizer=tok, sae=sae)      # objects you already hold
    pred.ranking(); pred.features[0].contexts

Names are resolved on first use, so `import sts` stays light (no torch) for the CLI.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PredictConfig": "sts.prediction", "Prediction": "sts.prediction",
    "predict": "sts.compare", "Comparison": "sts.compare",  # one set, or several and mixtures
    "Placement": "sts.models", "load_model": "sts.models", "load_sae": "sts.saes",
    "load_dataset": "sts.data", "training_and_domains": "sts.data", "clean_questions": "sts.data",
    "evaluate": "sts.evaluation", "Evaluation": "sts.evaluation",
    "finetune": "sts.finetuning", "FinetuneSpec": "sts.finetuning",
    "correlate": "sts.correlation", "changes_from_evaluations": "sts.correlation",
    "validate": "sts.validation", "ValidateConfig": "sts.validation",
    # the score registry: a new score is a ScoreSpec (of a built-in Kind or a new one) given to register
    "register": "sts.score", "ScoreSpec": "sts.score", "Kind": "sts.score", "Extraction": "sts.score",
    "REGISTRY": "sts.score", "formulas": "sts.score",
    # one config per stage (rules checked when built), and the named choices
    "ExtractConfig": "sts.extract", "ScoreConfig": "sts.score", "EvaluateConfig": "sts.evaluation",
    "FinetuneConfig": "sts.finetuning", "CorrelateConfig": "sts.correlation", "TrainSAEConfig": "sts.train_sae",
    "Method": "sts.choices", "Score": "sts.choices", "Metric": "sts.choices", "Mode": "sts.choices",
    "Protocol": "sts.choices", "load_stats": "sts.stats",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sts' has no attribute {name!r}")
