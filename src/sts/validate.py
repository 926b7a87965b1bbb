"""`sts validate`: check a prediction against the real thing, the way the paper does.

    predict (icl shift)  ->  finetune  ->  evaluate base and tuned  ->  predict (sft shift)
                         ->  correlate both predictions with the accuracy change per domain

Everything lands in one results folder:

    predict-icl/, predict-sft/     sts.json|csv|png (+ sts_samples.safetensors) of the primary score
    eval-base/, eval-tuned/        predictions.csv, accuracy.json
    tuned/                         the fine-tuned model (merged) and its LoRA adapter
    correlation-icl.*, correlation-sft.*   JSON, CSV, scatter plot (primary score and protocol)
    comparison.csv, comparison.png every score and baseline under every protocol, with intervals
    results.json, results.csv      the budget, timings, all correlations, one row per domain

Every score is computed from one extraction per shift, on the same questions: the domain
demonstrations of the icl score are left out of every score's questions, so the scores
compare like with like.
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
from sts.data import Dataset, Example, domain_demonstrations
from sts.errors import UserError, atomic_path
from sts.finetune import FinetuneSpec
from sts.score import BASELINES


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
    max_length: int = 1024
    batch_size: int = 8
    shots: int = 0
    replicates: int = 1000
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    use_cache: bool = True
    command: str = ""
    score: str = "sq"  # the primary score (scatter plots, predict-*/ folders)
    protocol: str = "signed"  # the primary protocol
    domain_demos: str | None = None
    domain_demos_n: int = 5
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
    from sts.predict import PredictConfig, Session, extract_all, prediction
    from sts.score import SCORES, check_score

    check_score(cfg.score)
    if cfg.protocol not in co.PROTOCOLS:
        raise UserError(f"unknown protocol {cfg.protocol!r}; use {', '.join(co.PROTOCOLS)}")
    protocols = [p for p in co.PROTOCOLS if p != "paper" or len(domains) >= 8]
    if cfg.protocol not in protocols:
        raise UserError(f"the paper protocol picks 8 domains but there are {len(domains)}; "
                        "use --protocol signed or abs")
    started = time.perf_counter()
    out = cfg.out
    demos, domains = domain_demonstrations(domains, cfg.domain_demos_n, cfg.domain_demos)
    predict_domains = {d: exs[: cfg.predict_examples] for d, exs in domains.items()}
    eval_domains = {d: exs[: cfg.eval_examples + cfg.shots] for d, exs in domains.items()}
    spec = cfg.finetune
    tuned_dir = out / "tuned"
    # Cosine and lexical do not depend on the shifted features: computed once, with icl.
    shift_scores = {"icl": SCORES, "sft": tuple(s for s in SCORES if s not in ("cosine", "lexical"))}
    predictions: dict[str, dict[str, Any]] = {}

    def predict_all(method: str) -> None:
        pcfg = PredictConfig(model=cfg.model, sae=cfg.sae, train=cfg.train.spec, domains=cfg.domains,
                             method=method, tuned_model=str(tuned_dir) if method == "sft" else None,
                             k=cfg.k, demos=cfg.demos, seed=cfg.seed, max_train=len(cfg.train.examples),
                             max_examples=cfg.predict_examples, max_length=cfg.max_length,
                             batch_size=cfg.batch_size, use_cache=cfg.use_cache, score=cfg.score,
                             domain_demos=cfg.domain_demos, domain_demos_n=cfg.domain_demos_n)
        session = Session(pcfg, progress)
        extraction = extract_all(pcfg, cfg.train, predict_domains, shift_scores[method], demos, progress, session)
        predictions[method] = {s: prediction(pcfg, extraction, s, cfg.train, session)
                               for s in shift_scores[method]}
        if cfg.score in predictions[method]:  # cosine and lexical: with the icl shift only
            report.write(predictions[method][cfg.score], out / f"predict-{method}")

    with _timed(cfg, "predict (icl)", progress):
        predict_all("icl")
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
        predict_all("sft")

    changes = co.changes_from_evaluations(base_eval, tuned_eval)
    comparison: list[dict[str, Any]] = []
    primary: dict[str, Any] = {}
    for method, preds in predictions.items():
        for name, pred in preds.items():
            for protocol in protocols:  # paper needs 8 domains
                corr = co.correlate(pred.scores, changes, cfg.replicates, cfg.seed,
                                    co.resampler(pred.samples), protocol)
                comparison.append({"shift": method, "score": name, "baseline": name in BASELINES,
                                   **asdict(corr)})
                if name == cfg.score and protocol == cfg.protocol:
                    co.write(corr, pred.scores, changes, out, f"correlation-{method}",
                             title=f"{name} ({method} shift) vs accuracy change after SFT", xlabel=name)
                    primary[method] = asdict(corr)
                    progress(f"[validate] {method} {name}: {co.summary(corr)}")
    write_comparison(comparison, out)

    cfg.timings["total"] = round(time.perf_counter() - started, 1)
    base_acc, tuned_acc = base_eval.accuracy(), tuned_eval.accuracy()
    first = predictions["icl"][cfg.score].scores
    rows = [{"domain": d, **{f"{m}:{s}": p.scores[d] for m, ps in predictions.items() for s, p in ps.items()},
             "accuracy_base": 100 * float(base_acc[d]["accuracy"]),
             "accuracy_tuned": 100 * float(tuned_acc[d]["accuracy"]), "delta": changes[d].delta,
             "questions": changes[d].questions}
            for d in sorted(changes, key=lambda d: -first[d])]
    budget = {"model": cfg.model, "sae": cfg.sae, "domains": cfg.domains, "train": cfg.train.spec,
              "train_examples": len(cfg.train.examples), "k": cfg.k, "demos": cfg.demos,
              "score": cfg.score, "protocol": cfg.protocol, "domain_demonstrations": demos.describe(),
              "predict_questions_per_domain": cfg.predict_examples,
              "eval_questions_per_domain": cfg.eval_examples, "eval_mode": "mc", "shots": cfg.shots,
              "finetune": asdict(spec), "bootstrap_replicates": cfg.replicates, "seed": cfg.seed}
    results = {"correlations": primary, "comparison": comparison, "budget": budget,
               "timings_s": cfg.timings, "domains": rows, "command": cfg.command}
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    header = list(rows[0])
    lines = [",".join(f'"{h}"' if "," in h else h for h in header)]
    lines += [",".join(f"{r[h]:.6g}" if isinstance(r[h], float) else str(r[h]) for h in header) for r in rows]
    with atomic_path(out / "results.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return results


def comparison_table(comparison: list[dict[str, Any]]) -> str:
    """Every score and baseline under every protocol: Pearson and Spearman with 95% intervals."""
    protocols = list(dict.fromkeys(c["protocol"] for c in comparison))
    head = f"{'shift':<5} {'score':<8} " + " ".join(f"{p + ' Pearson [95% CI]':<27}" for p in protocols)
    lines = [head]
    for (shift, score) in dict.fromkeys((c["shift"], c["score"]) for c in comparison):
        cells = []
        for p in protocols:
            c = next(c for c in comparison if (c["shift"], c["score"], c["protocol"]) == (shift, score, p))
            cells.append(f"{c['pearson']:+.2f} [{c['pearson_ci'][0]:+.2f}, {c['pearson_ci'][1]:+.2f}]".ljust(27))
        lines.append(f"{shift:<5} {score:<8} " + " ".join(cells))
    return "\n".join(lines)


def write_comparison(comparison: list[dict[str, Any]], out: Path) -> None:
    """comparison.csv (one row per shift x score x protocol) and comparison.png (Pearson with
    its 95% interval, one panel per protocol, baselines in grey)."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["shift", "score", "baseline", "protocol", "domains", "pearson", "pearson_lo", "pearson_hi",
                "spearman", "spearman_lo", "spearman_hi", "domains_used"])
    for c in comparison:
        w.writerow([c["shift"], c["score"], c["baseline"], c["protocol"], c["domains"],
                    *(f"{v:.4f}" for v in (c["pearson"], *c["pearson_ci"], c["spearman"], *c["spearman_ci"])),
                    ";".join(c["domains_used"])])
    with atomic_path(out / "comparison.csv") as tmp:
        tmp.write_text(buf.getvalue())
    protocols = list(dict.fromkeys(c["protocol"] for c in comparison))
    labels = list(dict.fromkeys(f"{c['score']} ({c['shift']})" for c in comparison))
    fig, axes = plt.subplots(1, len(protocols), figsize=(3.4 * len(protocols), 0.32 * len(labels) + 1.4),
                             sharey=True, squeeze=False)
    for ax, p in zip(axes[0], protocols):
        for i, label in enumerate(labels):
            c = next(c for c in comparison if f"{c['score']} ({c['shift']})" == label and c["protocol"] == p)
            color = "0.55" if c["baseline"] else "#3b6ea8"
            lo, hi = c["pearson_ci"]
            ax.errorbar(c["pearson"], i, xerr=[[c["pearson"] - lo], [hi - c["pearson"]]], fmt="o",
                        color=color, ms=4, capsize=2)
        ax.axvline(0, color="grey", lw=0.6, ls=":")
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(p + (" (outcome-chosen domains)" if p == "paper" else ""), fontsize=8)
        ax.set_xlabel("Pearson ρ, 95% CI", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    with atomic_path(out / "comparison.png") as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
