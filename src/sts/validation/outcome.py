"""What a validation measured against what it predicted: the measured changes, per-set and matrix
correlations, the swap test, own-domain ranks, the cells and the budget (`ValidationResult`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sts import files
from sts.analysis import correlation as co
from sts.analysis.correlate import load_sts, write
from sts.choices import PAPER_DOMAINS, REFERENCE_METRICS, Protocol
from sts.data.examples import Dataset
from sts.errors import UserError
from sts.scores.score import baselines, shift_scores
from sts.validation.config import ValidateConfig
from sts.validation.plan import Plan


@dataclass
class ValidationResult:
    """What a validation measured: results.json holds exactly these fields."""

    correlations: dict[str, dict[str, Any]]  # shift -> the primary row (first set, score, metric, protocol)
    per_train: list[dict[str, Any]]  # one row per set, shift, score, metric, protocol (correlations.csv)
    matrix: list[dict[str, Any]]  # pooled and specificity correlations over the sets
    signal: list[dict[str, Any]]  # the ground truth's spread over its standard error, per set and metric
    comparison: list[dict[str, Any]]  # every score and baseline on the first set, primary metric
    budget: dict[str, Any]  # what was run: model, SAE, sets, questions, fine-tuning spec, seeds
    timings_s: dict[str, float]
    stages_reused: list[str]
    cells: list[dict[str, Any]]  # the transfer matrix, one row per (set, domain) (results.csv)
    command: str
    swap: list[dict[str, Any]] = field(default_factory=list)  # per shift, score, metric (2+ sets): swap.csv
    own_domain: list[dict[str, Any]] = field(default_factory=list)  # sets drawn from one domain: own-domain.csv


Changes = dict[str, dict[str, dict[str, co.DomainChange]]]  # set -> metric -> domain -> change


def measured_changes(cfg: ValidateConfig, base: Any, base_reference: Any, per_train: dict[str, dict[str, Any]]
                     ) -> tuple[Changes, list[str]]:
    """Each set's per-domain change in every metric measured on the base model's questions,
    and cot_nll from the held-out reference records when there are some."""
    from sts.engine.evaluation import METRICS, Evaluation

    metrics: list[str] = [m for m in METRICS if base is not None and any(r.value(m) is not None for r in base.results)]
    tuned_reference = ({t: Evaluation.load(info["dir"] / "eval-tuned-reference") for t, info in per_train.items()}
                       if base_reference is not None else {})
    # cot_nll (and its content variant, where every evaluation measured it: older ones did not)
    # from the held-out reference records, not the questions
    on_reference = [str(m) for m in REFERENCE_METRICS if base_reference is not None and all(
        any(r.value(m) is not None for r in ev.results) for ev in [base_reference, *tuned_reference.values()])]
    if cfg.metric not in metrics + on_reference:
        raise UserError(f"metric {cfg.metric} was not measured on these questions (measured: "
                        f"{', '.join(metrics + on_reference)}); cot_nll needs --reference records with cot_content")
    changes: Changes = {t: {m: co.changes_from_evaluations(base, info["eval"], m) for m in metrics}
                        for t, info in per_train.items()}
    for t, tuned_ev in tuned_reference.items():
        for m in on_reference:
            changes[t][m] = co.changes_from_evaluations(base_reference, tuned_ev, m)
    return changes, list(dict.fromkeys(metrics + on_reference))


def per_set_correlations(cfg: ValidateConfig, per_train: dict[str, dict[str, Any]], changes: Changes,
                         metrics: list[str], protocols: list[Protocol]) -> list[dict[str, Any]]:
    """Every set x shift x score x metric x protocol; the primary score also resamples the
    training examples (its bootstrap samples sit beside its predict-SHIFT/sts.json)."""
    rows: list[dict[str, Any]] = []
    for t, info in per_train.items():
        for method, by_score in info["scores"].items():
            for score_name, values in by_score.items():
                sts_json = info["dir"] / f"predict-{method}" / files.STS_JSON
                resample = load_sts(sts_json)[1] if score_name == cfg.score and sts_json.is_file() else None
                for metric in metrics:
                    for protocol in protocols:
                        if protocol is Protocol.PAPER and len(set(values) & set(changes[t][metric])) < PAPER_DOMAINS:
                            continue  # e.g. cot_nll on fewer reference domains
                        primary = (metric, protocol) == (cfg.metric, cfg.protocol)
                        corr = co.correlate(values, changes[t][metric], cfg.replicates, cfg.seed,
                                            resample if primary else None, protocol, metric)
                        rows.append({"train": t, "shift": method, "score": score_name,
                                     "baseline": score_name in baselines(), **asdict(corr)})
                        if primary and score_name == cfg.score:
                            write(corr, values, changes[t][metric], info["dir"], f"correlation-{method}",
                                     title=f"{score_name} ({method} shift) vs {metric} change: {info['spec']}",
                                     xlabel=score_name)
    return rows


def matrix_correlations(cfg: ValidateConfig, per_train: dict[str, dict[str, Any]], changes: Changes,
                        metrics: list[str]) -> list[dict[str, Any]]:
    """Pooled (all cells) and, with 2+ sets, specificity (double-centred cells) correlations."""
    rows: list[dict[str, Any]] = []
    kinds = ("pooled", "specificity") if len(per_train) > 1 else ("pooled",)
    for method, names in (("icl", cfg.icl_scores), ("sft", shift_scores()))[:len(cfg.shifts)]:
        for score_name in names:
            matrix = {t: info["scores"][method][score_name] for t, info in per_train.items()}
            for metric in metrics:
                for kind in kinds:
                    mc = co.correlate_matrix(matrix, {t: changes[t][metric] for t in per_train}, kind,
                                             cfg.replicates, cfg.seed, metric)
                    rows.append({"train": kind, "shift": method, "score": score_name,
                                 "baseline": score_name in baselines(), **asdict(mc)})
    return rows


def swap_rows(cfg: ValidateConfig, per_train: dict[str, dict[str, Any]], changes: Changes,
              metrics: list[str]) -> list[dict[str, Any]]:
    """The swap test (`correlation.swap_test`) of every score of both shifts in every metric."""
    if len(per_train) < 2:
        return []
    rows = []
    for method, names in (("icl", cfg.icl_scores), ("sft", shift_scores()))[:len(cfg.shifts)]:
        for score_name in names:
            matrix = {t: info["scores"][method][score_name] for t, info in per_train.items()}
            for metric in metrics:
                st = co.swap_test(matrix, {t: changes[t][metric] for t in per_train}, cfg.replicates, cfg.seed,
                                  metric)
                rows.append({"shift": method, "score": score_name, "baseline": score_name in baselines(), **asdict(st)})
    return rows


def own_domain(train: Dataset, domains: list[str]) -> str | None:
    """The domain a training set is drawn from, if one: the one domain label all its examples
    carry (e.g. `SPEC#category=physics`), or math for competition-math sets (MATH, LIMO, CHAMP)."""
    labels = set(train.domains())
    if len(labels) == 1 and (label := labels.pop()) in domains:
        return label
    return "math" if train.schema == "math" and "math" in domains else None


def own_domain_rows(cfg: ValidateConfig, pl: Plan, per_train: dict[str, dict[str, Any]], changes: Changes
                    ) -> list[dict[str, Any]]:
    """Per set drawn from one domain and per score (icl shift): that domain's rank by the
    score beside its rank by the primary metric's change."""
    rows = []
    for train, (t, info) in zip(pl.inputs.trains, per_train.items()):
        measured = changes[t][cfg.metric]
        domain = own_domain(train, sorted(measured))
        if domain is None:
            continue
        for score_name, values in info["scores"]["icl"].items():
            if domain in values:
                rows.append({"train": t, "domain": domain, "score": score_name, "metric": cfg.metric,
                             "baseline": score_name in baselines(), **co.own_domain_rank(values, measured, domain)})
    return rows


def cells(cfg: ValidateConfig, per_train: dict[str, dict[str, Any]], changes: Changes,
          metrics: list[str]) -> list[dict[str, Any]]:
    """The transfer matrix, one row per (set, domain): every score of both shifts, every change."""
    return [{"train": t, "domain": d,
             **{f"{m}:{s}": info["scores"][m][s].get(d, "") for m in cfg.shifts for s in info["scores"][m]},
             **{f"change:{metric}": changes[t][metric][d].delta for metric in metrics if d in changes[t][metric]},
             "questions": changes[t][cfg.metric][d].questions if d in changes[t][cfg.metric] else ""}
            for t, info in per_train.items() for d in sorted(info["scores"]["icl"][cfg.score])]


def budget(pl: Plan, per_train: dict[str, dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    """What was run, for results.json."""
    c, inputs = pl.cfg, pl.inputs
    return {"model": c.model, "sae": c.sae, "domains": c.domains,
            "trains": {t: {"spec": info["spec"], "examples": len(inputs.trains[i].examples)}
                       for i, (t, info) in enumerate(per_train.items())},
            "k": c.k, "demos": c.demos, "score": c.score, "protocol": c.protocol,
            "metric": c.metric, "metrics": metrics, "domain_demonstrations": pl.demos.describe(),
            "excluded_questions": inputs.excluded,
            "predict_questions_per_domain": c.predict_examples,
            "eval_questions_per_domain": c.eval_examples, "eval_mode": "mc", "shots": c.shots,
            "reference": {"spec": c.reference, "records_per_domain": {d: len(q) for d, q in inputs.reference.items()}},
            # the gradient scores' domain side: which records it read, beside the evaluated ones
            "probes": inputs.probes.describe() if inputs.probes else None,
            "finetune": asdict(c.finetune), "bootstrap_replicates": c.replicates, "seed": c.seed}
