"""`sts validate`'s settings (`ValidateConfig`) and their rules, checked when built, and the
inputs they name, read and checked before any stage runs (`read_inputs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sts import defaults
from sts.choices import REFERENCE_METRICS, Metric, Protocol, parse
from sts.data.datasets import domain_demonstrations
from sts.data.examples import Dataset, Example
from sts.data.references import ReferenceSplit, probe_split
from sts.defaults import DEFAULT_SCORE
from sts.errors import UserError, check_positive, refuse_unused
from sts.options import option
from sts.prediction.config import SharedConfig
from sts.scores.score import check_score, gradient_scores, statistics_scores, validated_scores


@dataclass
class ValidateConfig(SharedConfig):
    """One `sts validate` run. Every rule between fields is checked once, here; the data
    (training sets, domain questions, reference records) is read by `validate`. The settings a
    prediction shares are `SharedConfig`'s, written once."""

    out: Path = option(Path("validate"), help="results folder (a rerun resumes: finished stages are verified and "
                       "reused)")
    train: list[str] = option(factory=lambda: [defaults.TRAIN], help="training set; repeat for a transfer matrix "
                              "(default: CHAMP, embedded; SPEC#category=NAME selects one domain of a file)")
    domains: str = option(defaults.DOMAINS, help="multiple-choice questions with domain labels")
    exclude: list[str] = option(factory=list, help="also leave out domain questions found in this dataset (repeat), "
                                "e.g. the MMLU-Pro test set when training on MMLU-Pro data and evaluating on MMLU")
    max_train: int = option(defaults.FINETUNE_MAX_TRAIN, min=1, help="training examples (shift and fine-tuning)")
    predict_examples: int = option(defaults.PREDICT_MAX_EXAMPLES, min=1, help="questions per domain for STS")
    eval_examples: int = option(defaults.EVAL_EXAMPLES, min=1, help="questions per domain for the ground truth")
    shots: int = option(defaults.SHOTS, min=0, help="evaluation demonstrations per prompt")
    replicates: int = option(defaults.REPLICATES, min=1, help="bootstrap replicates")
    command: str = ""
    score: str = option(DEFAULT_SCORE, metavar="SCORE", help="primary score (scatter plots, predict-*/), {choices}; "
                        "every score the extraction serves is reported")
    protocol: Protocol = option(defaults.PROTOCOL, help="primary correlation protocol: signed, abs or paper; every "
                                "protocol is reported")
    metric: Metric = option(defaults.METRIC, help="primary ground truth: acc, nll, acc_norm, p_correct, cot_nll or "
                            "cot_nll_content; every measured metric is reported")
    likelihoods: bool = True  # measure nll, acc_norm, p_correct, cot_nll too
    # cot_nll's ground truth: records with a reference chain of thought per domain (held out of
    # every training set), evaluated in mode `reference` beside the multiple-choice questions
    reference: str | None = option(None, help="cot_nll's ground truth: records with a reference chain of thought "
                                   "(cot_content) per domain, e.g. MMLU-Pro CoT records; records in any training set "
                                   "are left out")
    reference_examples: int = option(defaults.REFERENCE_EXAMPLES, min=1, help="reference records per domain")
    # the gradient scores' domain side: this many records a domain, drawn (seeded) from the domain's
    # records after the evaluated ones (`sts.data.references.probe_split`), or the records of `probes`
    # (a dataset; refused where it shares a question with an evaluated record)
    probe_records: int = option(defaults.PROBE_RECORDS, min=1, help="gradient scores: records a domain their domain "
                                "side reads, drawn (seeded) from the records after the evaluated ones; never an "
                                "evaluated record")
    probes: str | None = option(None, help="gradient scores: a dataset of your own probe records per domain instead of "
                                "the draw (refused where one shares a question with an evaluated record)")
    # also the gradient scores (grad, grad-adam): a backward pass per training example and domain
    # record; None: on exactly when the primary score is one of them (the default, grad, is)
    gradients: bool | None = option(None, help="also the gradient scores grad and grad-adam (a backward pass per "
                                    "training example and domain record); default: on when --score is one of them")
    # the stages a round whose ground truth is cot_nll alone can skip (a set in well under an hour):
    sft_shift: bool = option(True, help="also predict with the tuned model's shift (sft); off: a stage less per set")
    question_evaluation: bool = option(True, help="evaluate the multiple-choice questions (acc, nll, ...) of the base "
                                       "and tuned models; off: cot_nll on --reference only (needs --metric cot_nll)")

    @property
    def shifts(self) -> tuple[str, ...]:
        return ("icl", "sft") if self.sft_shift else ("icl",)

    @property
    def icl_scores(self) -> tuple[str, ...]:
        """Every score computed with the icl shift: all statistics scores, and the gradient ones if asked."""
        return statistics_scores() + (gradient_scores() if self.gradients else ())

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.finetune = dataclasses.replace(self.finetune, seed=self.seed)  # one --seed: the fine-tuning run's too
        self.score = check_score(self.score)
        if self.gradients is None:
            self.gradients = self.score in gradient_scores()
        if self.score not in validated_scores():
            raise UserError(f"sts validate does not run --score {self.score} (it runs {', '.join(validated_scores())}; "
                            "a lookahead score runs the recipe's first steps per set, which experiments/beyond/"
                            "candidates.py measures beside a validation): choose another --score")
        if self.score in gradient_scores() and not self.gradients:
            raise UserError(f"--score {self.score} is a gradient score: drop --no-gradients, or choose a score "
                            "that needs no backward pass (e.g. --score act)")
        self.protocol = parse(Protocol, self.protocol, "--protocol")
        self.metric = parse(Metric, self.metric, "--metric")
        if not self.train:
            raise UserError("give at least one --train")
        if len(set(self.train)) < len(self.train):
            raise UserError("a training set is given twice; give each --train once")
        if self.shots < 0:
            raise UserError(f"--shots must be 0 or more (got {self.shots})")
        check_positive({"--max-train": self.max_train, "--predict-examples": self.predict_examples,
                        "--eval-examples": self.eval_examples, "--k": self.k, "--demos": self.demos,
                        "--replicates": self.replicates, "--batch-size": self.batch_size,
                        "--batch-tokens": self.batch_tokens, "--domain-demos-n": self.domain_demos_n,
                        "--reference-examples": self.reference_examples, "--probe-records": self.probe_records})
        if not self.question_evaluation and (self.reference is None or self.metric not in REFERENCE_METRICS):
            raise UserError("--no-question-evaluation leaves cot_nll (and cot_nll_content) on the --reference records "
                            "as the only ground truth: give --reference and --metric cot_nll")
        if self.reference is None and self.reference_examples != defaults.REFERENCE_EXAMPLES:
            raise UserError("--reference-examples sizes the --reference records, which were not given: "
                            "drop it or add --reference")
        refuse_unused([("--probes", self.probes is not None and not self.gradients,
                        "it is the gradient scores' domain side (add --gradients)"),
                       ("--probe-records", self.probe_records != defaults.PROBE_RECORDS and not self.gradients,
                        "it sizes the gradient scores' domain side (add --gradients)"),
                       ("--probe-records", self.probe_records != defaults.PROBE_RECORDS and self.probes is not None,
                        "--probes gives the probe records themselves")])
        self.placement.resolved()  # a bad device or dtype fails here, in one line


@dataclass
class Inputs:
    """The data a validation reads: the training sets, the domain questions (every training
    set's questions left out, and any --exclude dataset's), the reference records (evaluated),
    and the gradient scores' probe records (never evaluated: `sts.data.references`)."""

    trains: list[Dataset]
    domains: dict[str, list[Example]]
    excluded: dict[str, int]  # per domain: questions left out (contamination)
    reference: dict[str, list[Example]]
    probes: ReferenceSplit | None = None  # the gradient scores' domain side and what it was split from


def read_inputs(cfg: ValidateConfig) -> Inputs:
    from sts.data.datasets import clean_questions, load_dataset

    trains = [load_dataset(t, max_examples=cfg.max_train) for t in cfg.train]
    seen = tuple(e for t in trains for e in t.examples)
    # demonstrations (domain_demos_n) are left out of the domains' questions; with the gradient
    # scores on the questions (no --reference), their probe records come after the evaluated ones
    evaluated = cfg.eval_examples + cfg.shots
    probing = cfg.gradients and not (cfg.reference and cfg.metric in REFERENCE_METRICS)
    per_domain = max(cfg.predict_examples, evaluated + (cfg.probe_records if probing else 0)) + cfg.domain_demos_n
    groups, removed = clean_questions(cfg.domains, cfg.exclude, per_domain, examples=seen)
    given = None
    if cfg.probes:
        given, _ = clean_questions(cfg.probes, [], None, examples=seen)
    references: dict[str, list[Example]] = {}
    split = None
    if cfg.reference:
        records, _ = clean_questions(cfg.reference, [], None, examples=seen)
        with_cot = {d: kept for d, q in records.items() if (kept := [e for e in q if e.cot])}
        if not with_cot:
            raise UserError(f"--reference {cfg.reference}: no record with a reference chain of thought (cot_content) "
                            "is left; give MMLU-Pro-style records with cot_content")
        references = {d: q[:cfg.reference_examples] for d, q in with_cot.items()}
        if cfg.gradients and not probing:
            split = probe_split(with_cot, cfg.reference_examples, cfg.probe_records, cfg.seed,
                                given and {d: [e for e in q if e.cot] for d, q in given.items()},
                                cfg.probes or cfg.reference)
    if probing:  # the domain questions are the ground truth: their evaluated ones are never probed
        _demos, questions = domain_demonstrations(groups, cfg.domain_demos_n, cfg.domain_demos)
        split = probe_split(questions, evaluated, cfg.probe_records, cfg.seed, given, cfg.probes or cfg.domains)
    return Inputs(trains, groups, removed, references, split)
