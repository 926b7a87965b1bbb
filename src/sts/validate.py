"""`sts validate`: check a prediction against the real thing, the way the paper does.

    predict (icl shift)  ->  finetune  ->  evaluate base and tuned  ->  predict (sft shift)
                         ->  correlate both predictions with the accuracy change per domain

Everything lands in one results folder:

    predict-icl/, predict-sft/     sts.json|csv|png (+ sts_samples.safetensors)
    eval-base/, eval-tuned/        predictions.csv, accuracy.json
    tuned/                         the fine-tuned model (merged) and its LoRA adapter
    correlation-icl.*, correlation-sft.*   JSON, CSV, scatter plot
    results.json, results.csv      the budget, timings, both correlations, one row per domain
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sts import correlate as co
from sts.data import Dataset, Example
from sts.errors import atomic_path
from sts.finetune import FinetuneSpec


@dataclass
class ValidateConfig:
    model: str
    sae: str
    domains: str
    out: Path
    train: Dataset
    k: int = 100
    demos: int = 2
    seed: int = 0
    predict_examples: int = 100  # questions per domain for STS
    eval_examples: int = 100  # questions per domain for accuracy
    max_length: int = 512
    batch_size: int = 8
    shots: int = 0
    replicates: int = 1000
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    use_cache: bool = True
    command: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _timed(cfg: ValidateConfig, name: str, progress: Callable[[str], None]) -> Iterator[None]:
    """Announce a stage, and record its wall time in cfg.timings."""
    progress(f"[validate] {name}")
    started = time.perf_counter()
    yield
    cfg.timings[name] = round(time.perf_counter() - started, 1)
    progress(f"[validate] {name} done in {cfg.timings[name]:.0f} s")


def validate(cfg: ValidateConfig, domains: dict[str, list[Example]],
             progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the loop; `domains` are the questions (training questions already held out)."""
    from sts import report
    from sts.evaluate import evaluate
    from sts.finetune import finetune
    from sts.models import load_model
    from sts.predict import PredictConfig, predict

    started = time.perf_counter()
    out = cfg.out
    predict_domains = {d: exs[: cfg.predict_examples] for d, exs in domains.items()}
    eval_domains = {d: exs[: cfg.eval_examples + cfg.shots] for d, exs in domains.items()}
    spec = cfg.finetune
    tuned_dir = out / "tuned"

    def prediction(method: str) -> Any:
        pcfg = PredictConfig(model=cfg.model, sae=cfg.sae, train=cfg.train.spec, domains=cfg.domains,
                             method=method, tuned_model=str(tuned_dir) if method == "sft" else None,
                             k=cfg.k, demos=cfg.demos, seed=cfg.seed, max_train=len(cfg.train.examples),
                             max_examples=cfg.predict_examples, max_length=cfg.max_length,
                             batch_size=cfg.batch_size, use_cache=cfg.use_cache)
        pred = predict(pcfg, cfg.train, predict_domains, progress)
        report.write(pred, out / f"predict-{method}")
        return pred

    with _timed(cfg, "predict (icl)", progress):
        icl = prediction("icl")
    base_lm = load_model(cfg.model)
    with _timed(cfg, "finetune", progress):
        finetune(base_lm, cfg.train.examples, spec, tuned_dir, cfg.command)
    with _timed(cfg, "evaluate base", progress):
        base_eval = evaluate(base_lm, eval_domains, shots=cfg.shots, batch_size=cfg.batch_size)
        base_eval.save(out / "eval-base")
    del base_lm
    with _timed(cfg, "evaluate tuned", progress):
        tuned_eval = evaluate(load_model(str(tuned_dir)), eval_domains, shots=cfg.shots,
                              batch_size=cfg.batch_size)
        tuned_eval.save(out / "eval-tuned")
    with _timed(cfg, "predict (sft)", progress):
        sft = prediction("sft")

    changes = co.changes_from_evaluations(base_eval, tuned_eval)
    results: dict[str, Any] = {"correlations": {}}
    for name, pred in (("icl", icl), ("sft", sft)):
        corr = co.correlate(pred.scores, changes, cfg.replicates, cfg.seed, co.resampler(pred.samples))
        co.write(corr, pred.scores, changes, out, f"correlation-{name}",
                 title=f"STS ({name} shift) vs accuracy change after SFT")
        results["correlations"][name] = asdict(corr)
        progress(f"[validate] {name}: {co.summary(corr)}")

    cfg.timings["total"] = round(time.perf_counter() - started, 1)
    base_acc, tuned_acc = base_eval.accuracy(), tuned_eval.accuracy()
    rows = [{"domain": d, "sts_icl": icl.scores[d], "sts_sft": sft.scores[d],
             "accuracy_base": 100 * float(base_acc[d]["accuracy"]),
             "accuracy_tuned": 100 * float(tuned_acc[d]["accuracy"]), "delta": changes[d].delta,
             "questions": changes[d].questions}
            for d in sorted(changes, key=lambda d: -icl.scores[d])]
    budget = {"model": cfg.model, "sae": cfg.sae, "domains": cfg.domains, "train": cfg.train.spec,
              "train_examples": len(cfg.train.examples), "k": cfg.k, "demos": cfg.demos,
              "predict_questions_per_domain": cfg.predict_examples,
              "eval_questions_per_domain": cfg.eval_examples, "eval_mode": "mc", "shots": cfg.shots,
              "finetune": asdict(spec), "bootstrap_replicates": cfg.replicates, "seed": cfg.seed}
    results |= {"budget": budget, "timings_s": cfg.timings, "domains": rows, "command": cfg.command}
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(f"{r[h]:.6g}" if isinstance(r[h], float) else str(r[h])
                                           for h in header) for r in rows]
    with atomic_path(out / "results.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return results
