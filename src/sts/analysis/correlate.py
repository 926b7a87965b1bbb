"""`sts correlate`: a prediction's scores against the measured changes of a base and a tuned
evaluation (or a table of them), with intervals, as JSON, CSV and a scatter plot.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sts import defaults, files
from sts.analysis.correlation import Correlation, DomainChange, changes_from_evaluations, correlate
from sts.choices import PAPER_DOMAINS, Metric, Protocol, parse
from sts.errors import UserError, check_positive
from sts.files import atomic_path
from sts.options import option


def changes_from_table(table: Path, questions: str, base_model: str, tuned_model: str
                       ) -> dict[str, DomainChange]:
    """Per-domain changes between two model columns of a prediction table. Questions come
    from a dataset spec with ids, domains and answers (MMLU-Pro: question_id, category,
    answer); an empty cell is an unanswered question and counts as wrong."""
    from sts.data.datasets import load_dataset

    if not Path(table).is_file():
        raise UserError(f"prediction table not found: {table}")
    key = {e.uid: (e.domain or "all", e.answer) for e in load_dataset(questions).examples}
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if "question_id" not in columns:
            raise UserError(f"{table}: no question_id column; expected question_id + one column per model")
        missing = [m for m in (base_model, tuned_model) if m not in columns]
        if missing:
            models = ", ".join(c for c in columns if c != "question_id")
            raise UserError(f"{table}: no column {', '.join(missing)}; models there: {models}")
        pairs: dict[str, list[tuple[bool, bool]]] = {}
        for row in reader:
            q = key.get(str(row["question_id"]).strip())
            if q is None:
                continue
            domain, answer = q
            pairs.setdefault(domain, []).append(((row[base_model] or "").strip() == answer,
                                                 (row[tuned_model] or "").strip() == answer))
    if not pairs:
        raise UserError(f"no question_id of {table} is in {questions}; give the matching question file")
    return {d: DomainChange(np.array([a for a, _ in p], float), np.array([b for _, b in p], float))
            for d, p in sorted(pairs.items())}


def load_sts(path: Path) -> tuple[dict[str, float], Callable[[np.random.Generator], dict[str, float]] | None]:
    """Scores from `sts predict`'s sts.json (or `sts score`'s JSON), and a resampler of the
    training examples when sts_samples.safetensors sits beside it. Reading the scores alone
    imports no torch (a notebook can read predictions without it); the samples need it."""
    if not Path(path).is_file():
        raise UserError(f"STS file not found: {path} (write it with `sts predict` or `sts score`)")
    try:
        scores = {str(k): float(v) for k, v in json.loads(Path(path).read_text())["scores"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: no 'scores' mapping of domain -> STS; give the sts.json of `sts predict`") from None
    samples_path = Path(path).parent / files.SAMPLES
    if not samples_path.is_file():
        return scores, None
    from sts.scores.selection import ShiftSamples

    samples = ShiftSamples.load(samples_path)
    if set(samples.domain_values) != set(scores):
        return scores, None
    return scores, resampler(samples)


def resampler(samples: object | None) -> Callable[[np.random.Generator], dict[str, float]] | None:
    """STS recomputed on a bootstrap resample of the training examples (None if unavailable)."""
    import torch

    from sts.scores.selection import ShiftSamples

    if not isinstance(samples, ShiftSamples) or samples.example_shift.shape[0] < 2:
        return None
    n = samples.example_shift.shape[0]

    def resample(rng: np.random.Generator) -> dict[str, float]:
        return samples.scores(torch.from_numpy(rng.integers(0, n, n)))

    return resample


def rows(sts: dict[str, float], changes: dict[str, DomainChange]) -> list[dict[str, float | str | int]]:
    return [{"domain": d, "sts": sts[d], "accuracy_base": 100 * float(changes[d].base.mean()),
             "accuracy_tuned": 100 * float(changes[d].tuned.mean()), "delta": changes[d].delta,
             "questions": changes[d].questions}
            for d in sorted(set(sts) & set(changes), key=lambda d: -sts[d])]


def to_json(corr: Correlation, sts: dict[str, float], changes: dict[str, DomainChange],
            label: str) -> dict:
    return {"label": label, **asdict(corr), "domains": rows(sts, changes)}


def write_csv(sts: dict[str, float], changes: dict[str, DomainChange], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["domain", "sts", "accuracy_base", "accuracy_tuned", "delta_points", "questions"])
        for r in rows(sts, changes):
            w.writerow([r["domain"], f"{r['sts']:.8g}", f"{r['accuracy_base']:.2f}",
                        f"{r['accuracy_tuned']:.2f}", f"{r['delta']:.2f}", r["questions"]])


def scatter(sts: dict[str, float], changes: dict[str, DomainChange], corr: Correlation, path: Path,
            title: str = "", xlabel: str = "STS") -> None:
    """One labelled point per domain, a least-squares line, rho and its interval in a corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = corr.domains_used or sorted(set(sts) & set(changes))
    x = np.array([sts[d] for d in domains])
    y = np.array([changes[d].delta for d in domains])
    if corr.protocol != "signed":
        y = np.abs(y)
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.scatter(x, y, s=28, color="#3b6ea8", zorder=3)
    for d, xi, yi in zip(domains, x, y):
        ax.annotate(d, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 50)
        ax.plot(grid, slope * grid + intercept, color="#c0392b", lw=1.2, zorder=2)
    ax.axhline(0, color="grey", lw=0.6, ls=":")
    lo, hi = corr.pearson_ci
    ax.text(0.03, 0.96, f"ρ = {corr.pearson:.2f} [{lo:.2f}, {hi:.2f}]\n"
                        f"Spearman = {corr.spearman:.2f} [{corr.spearman_ci[0]:.2f}, {corr.spearman_ci[1]:.2f}]",
            transform=ax.transAxes, va="top", fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.8"})
    ax.set_xlabel(xlabel)

    change = f"{corr.metric} change ({Metric(corr.metric).units})"
    ax.set_ylabel(change if corr.protocol == "signed" else f"|{change}|")
    if corr.protocol == "paper":
        ax.text(0.97, 0.03, f"{PAPER_DOMAINS} domains chosen from the outcome", transform=ax.transAxes,
                ha="right", fontsize=7, color="0.4")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=150)
    plt.close(fig)


def write(corr: Correlation, sts: dict[str, float], changes: dict[str, DomainChange], out_dir: Path,
          name: str = "correlation", title: str = "", xlabel: str = "STS") -> list[Path]:
    """NAME.json, NAME.csv and NAME.png in out_dir, each written atomically; the rows are the
    domains the protocol used."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if corr.domains_used:
        sts = {d: v for d, v in sts.items() if d in corr.domains_used}
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.csv", out_dir / f"{name}.png"]
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(to_json(corr, sts, changes, title or name), indent=2) + "\n")
    write_csv(sts, changes, paths[1])
    with atomic_path(paths[2]) as tmp:
        scatter(sts, changes, corr, tmp, title, xlabel)
    return paths


def summary(corr: Correlation) -> str:
    return (f"[{corr.metric}, {corr.protocol}] Pearson {corr.pearson:+.3f} "
            f"[{corr.pearson_ci[0]:+.3f}, {corr.pearson_ci[1]:+.3f}]  "
            f"Spearman {corr.spearman:+.3f} [{corr.spearman_ci[0]:+.3f}, {corr.spearman_ci[1]:+.3f}]  "
            f"({corr.domains} domains, {corr.replicates} bootstrap replicates; resampled: "
            f"{', '.join(corr.resampled)})")


@dataclass
class CorrelateConfig:
    """One `sts correlate` run: STS scores (`sts`) against per-domain changes, from two
    `sts evaluate` outputs (`base`, `tuned`) or from a per-question prediction table."""

    sts: Path = option(help="STS scores: sts.json of `sts predict` (sts_samples.safetensors beside it adds the "
                       "shift to the bootstrap)")
    out: Path = option(Path("out"), help="output directory for correlation.json|csv|png")
    base: Path | None = option(None, help="`sts evaluate` output of the base model")
    tuned: Path | None = option(None, help="`sts evaluate` output of the fine-tuned model")
    table: Path | None = option(None, help="per-question prediction table (question_id + one column per model)")
    questions: str | None = option(None, help="question file for --table (ids, domains, answers), e.g. MMLU-Pro test")
    base_model: str | None = option(None, help="base model column of --table")
    tuned_model: str | None = option(None, help="fine-tuned model column of --table")
    replicates: int = option(defaults.REPLICATES, min=1, help="bootstrap replicates")
    seed: int = option(defaults.SEED, help="bootstrap seed")
    name: str = option("correlation", help="output file stem")
    protocol: Protocol = option(defaults.PROTOCOL, help="signed (all domains, signed change; default), abs (all "
                                "domains, absolute change), paper (absolute change, 4 largest + 4 smallest: chosen "
                                "from the outcome)")
    metric: Metric = option(defaults.METRIC, help="ground truth (--base/--tuned): acc, nll, acc_norm, p_correct, "
                            "cot_nll or cot_nll_content (cot_nll after MMLU-Pro's templated opening)")

    def __post_init__(self) -> None:
        self.protocol = parse(Protocol, self.protocol, "--protocol")
        self.metric = parse(Metric, self.metric, "--metric")
        check_positive({"--replicates": self.replicates})
        if self.table is not None:
            if self.base is not None or self.tuned is not None:
                raise UserError("give either --table (with --questions, --base-model, --tuned-model) or --base/--tuned")
            if not self.questions or not self.base_model or not self.tuned_model:
                raise UserError("--table needs --questions, --base-model and --tuned-model")
        elif self.base is None or self.tuned is None:
            raise UserError("give --base and --tuned (`sts evaluate` outputs), or --table")
        elif self.questions or self.base_model or self.tuned_model:
            raise UserError("--questions, --base-model and --tuned-model read a --table; with --base/--tuned "
                            "drop them")


@dataclass
class CorrelateResult:
    correlation: Correlation
    scores: dict[str, float]
    changes: dict[str, DomainChange]
    paths: list[Path]


def run(cfg: CorrelateConfig) -> CorrelateResult:
    """Read the scores and the changes, correlate, write cfg.out/NAME.json|csv|png."""
    from sts.engine.evaluation import Evaluation

    scores, resample = load_sts(cfg.sts)
    if cfg.table is not None:
        assert cfg.questions and cfg.base_model and cfg.tuned_model
        changes = changes_from_table(cfg.table, cfg.questions, cfg.base_model, cfg.tuned_model)
        title = f"{cfg.base_model} -> {cfg.tuned_model}"
    else:
        assert cfg.base is not None and cfg.tuned is not None
        changes = changes_from_evaluations(Evaluation.load(cfg.base), Evaluation.load(cfg.tuned), cfg.metric)
        title = f"{cfg.base.name} -> {cfg.tuned.name}"
    corr = correlate(scores, changes, cfg.replicates, cfg.seed, resample, cfg.protocol, cfg.metric)
    paths = write(corr, scores, changes, cfg.out, cfg.name, title)
    return CorrelateResult(corr, scores, changes, paths)
