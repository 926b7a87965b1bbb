"""`sts validate`'s settings (`ValidateConfig`) and their rules, checked when built, and the
inputs they name, read and checked before any stage runs (`read_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sts import defaults
from sts.choices import REFERENCE_METRICS, Metric, Protocol, parse
from sts.data.datasets import domain_demonstrations
from sts.data.examples import Dataset, Example
from sts.data.references import ReferenceSplit, probe_split
from sts.defaults import DEFAULT_K, DEFAULT_SCORE
from sts.engine.finetuning import FinetuneSpec
from sts.engine.models import Placement
from sts.errors import UserError, check_positive, refuse_unused
from sts.scores.score import check_score, gradient_scores, spec_of, statistics_scores


@dataclass
class ValidateConfig:
    """One `sts validate` run. Every rule between fields is checked once, here; the data
    (training sets, domain questions, reference records) is read by `validate`."""

    out: Path = Path("validate")
    train: list[str] = field(default_factory=lambda: [defaults.TRAIN])  # one or more training sets
    model: str = ""  # "": the embedded SmolLM2-135M-Instruct
    sae: str = ""  # "": the embedded SAE
    domains: str = defaults.DOMAINS
    exclude: list[str] = field(default_factory=list)  # datasets whose questions are left out too
    max_train: int = defaults.FINETUNE_MAX_TRAIN  # training examples (shift and fine-tuning)
    k: int = DEFAULT_K
    demos: int = defaults.DEMOS
    seed: int = defaults.SEED
    predict_examples: int = defaults.PREDICT_MAX_EXAMPLES  # questions per domain for STS
    eval_examples: int = defaults.EVAL_EXAMPLES  # questions per domain for the ground truth
    max_length: int = defaults.MAX_LENGTH
    batch_size: int | None = None  # cap on sequences per forward pass (None: --batch-tokens decides)
    batch_tokens: int = defaults.BATCH_TOKENS
    placement: Placement = field(default_factory=Placement)
    shots: int = defaults.SHOTS
    replicates: int = defaults.REPLICATES
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    use_cache: bool = True
    command: str = ""
    score: str = DEFAULT_SCORE  # the primary score (figures, predict-*/ folders)
    protocol: Protocol = defaults.PROTOCOL  # the primary protocol
    metric: Metric = defaults.METRIC  # the primary ground-truth metric
    first_token: bool = defaults.PREDICT_FIRST_TOKEN  # count each domain question's first token
    domain_demos: str | None = None
    domain_demos_n: int = defaults.DOMAIN_DEMOS_N
    likelihoods: bool = True  # measure nll, acc_norm, p_correct, cot_nll too
    # cot_nll's ground truth: records with a reference chain of thought per domain (held out of
    # every training set), evaluated in mode `reference` beside the multiple-choice questions
    reference: str | None = None
    reference_examples: int = defaults.REFERENCE_EXAMPLES  # reference records per domain
    # the gradient scores' domain side: this many records a domain, drawn (seeded) from the domain's
    # records after the evaluated ones (`sts.data.references.probe_split`), or the records of `probes`
    # (a dataset; refused where it shares a question with an evaluated record)
    probe_records: int = defaults.PROBE_RECORDS
    probes: str | None = None
    # also the gradient scores (grad, grad-adam): a backward pass per training example and domain
    # record; None: on exactly when the primary score is one of them (the default, grad, is)
    gradients: bool | None = None
    # the stages a round whose ground truth is cot_nll alone can skip (a set in well under an hour):
    sft_shift: bool = True  # predict with the tuned model's shift (needs nothing the ground truth needs)
    question_evaluation: bool = True  # evaluate the multiple-choice questions (acc, nll, ...) of base and tuned

    @property
    def shifts(self) -> tuple[str, ...]:
        return ("icl", "sft") if self.sft_shift else ("icl",)

    @property
    def icl_scores(self) -> tuple[str, ...]:
        """Every score computed with the icl shift: all statistics scores, and the gradient ones if asked."""
        return statistics_scores() + (gradient_scores() if self.gradients else ())

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.score = check_score(self.score)
        if self.gradients is None:
            self.gradients = self.score in gradient_scores()
        if spec_of(self.score).reads("lookahead"):
            raise UserError(f"sts validate does not run --score {self.score} (a lookahead score: the run's first steps "
                            "per set); docs/results/beyond/candidates.py measures it beside a validation: choose "
                            "another --score")
        if self.score in gradient_scores() and not self.gradients:
            raise UserError(f"--score {self.score} is a gradient score: drop --no-gradients, or choose a score "
                            "that needs no backward pass (e.g. --score act)")
        assert self.score in self.icl_scores, f"{self.score} is in no score list"  # every kind but lookahead is
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
