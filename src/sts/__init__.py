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
    "PredictConfig": "sts.prediction.config", "Prediction": "sts.prediction.result",
    "predict": "sts.prediction.compare", "Comparison": "sts.prediction.compare",  # one set, or several and mixtures
    "Placement": "sts.engine.settings", "load_model": "sts.engine.models", "load_sae": "sts.engine.saes",
    "load_dataset": "sts.data.datasets", "training_and_domains": "sts.data.datasets",
    "clean_questions": "sts.data.datasets",
    "evaluate": "sts.engine.evaluation", "Evaluation": "sts.engine.evaluation",
    "finetune": "sts.engine.finetuning", "FinetuneSpec": "sts.engine.settings",
    "correlate": "sts.analysis.correlation", "changes_from_evaluations": "sts.analysis.correlation",
    "validate": "sts.validation.validate", "ValidateConfig": "sts.validation.config",
    # the score registry: a new score is a ScoreSpec (of a built-in Kind or a new one) given to register
    "register": "sts.scores.score", "ScoreSpec": "sts.scores.score", "Kind": "sts.scores.score",
    "Extraction": "sts.scores.score",
    "REGISTRY": "sts.scores.score", "formulas": "sts.scores.score",
    # one config per stage (rules checked when built), and the named choices
    "ExtractConfig": "sts.engine.settings", "ScoreConfig": "sts.scores.settings",
    "EvaluateConfig": "sts.engine.settings",
    "FinetuneConfig": "sts.engine.settings", "CorrelateConfig": "sts.analysis.correlate",
    "TrainSAEConfig": "sts.engine.settings",
    "Method": "sts.choices", "Score": "sts.choices", "Metric": "sts.choices", "Mode": "sts.choices",
    "Protocol": "sts.choices", "load_stats": "sts.engine.stats",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sts' has no attribute {name!r}")
