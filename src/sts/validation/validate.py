"""`sts validate`: check predictions against the real thing, over one or many training sets.

    base model   -> evaluate once (every metric)
    for each training set T:
        predict (icl shift: every score and baseline) -> finetune -> evaluate the tuned model
        -> predict (sft shift, with the tuned model)
    -> the transfer matrix: score[T, domain] per score, change[T, domain] per metric; per set,
       pooled and specificity correlations with bootstrap intervals; tables and figures

Everything lands in one results folder:

    eval-base/                     predictions.csv, accuracy.json (once)
    train-K-NAME/                  per training set: predict-icl/, predict-sft/ (sts.json|csv|png of
                                   the primary score), scores-icl.json, scores-sft.json (every
                                   score), tuned/ (not committed), eval-tuned/, correlation-icl|sft.*
    matrices/                      score-SHIFT-SCORE.csv, change-METRIC.csv (training sets x domains)
    correlations.csv               one row per (training set | pooled | specificity, shift, score,
                                   metric, protocol): Pearson, Spearman, 95% intervals
    comparison.csv|png             the first training set: every score under every protocol
    heatmaps.png, specificity.png  the primary score and metric, raw and double-centred
    results.json, results.csv      budget, timings, stages, every correlation, one row per cell
    stages/                        one manifest per finished stage: the sha256 of its outputs

The run is resumable: a stage whose manifest verifies (its outputs present, with the recorded
hashes, and its inputs unchanged) is reused; anything else is recomputed. Every score of a
training set comes from one extraction per shift, on the same questions: the domain
demonstrations of the icl score are left out of every score's questions, and every question
found in any training set is left out of every domain (`sts.data.datasets.decontaminate`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sts import defaults, files
from sts.analysis import correlation as co
from sts.analysis import library
from sts.choices import DEFAULT_K, DEFAULT_SCORE, PAPER_DOMAINS, REFERENCE_METRICS, Method, Metric, Protocol, parse
from sts.data.datasets import Dataset, DomainDemos, Example, domain_demonstrations
from sts.data.references import ReferenceSplit, probe_split
from sts.engine.finetuning import FinetuneSpec
from sts.engine.models import Placement
from sts.errors import UserError, check_positive, refuse_unused
from sts.files import atomic_path, write_csv
from sts.scores.score import baselines, check_score, gradient_scores, shift_scores, spec_of, statistics_scores
from sts.validation.stages import Stages, settings_key

# Cosine and lexical do not depend on the shifted features: computed with the icl shift only.


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


# --- resumable evaluation ----------------------------------------------------------------------

def evaluate_in_parts(model: str, load: Callable[[], Any], where: Path, groups: dict[str, list[Example]],
                      settings: dict[str, Any], run: Callable[[Any, dict[str, list[Example]]], Any],
                      progress: Callable[[str], None] = lambda _m: None) -> None:
    """Evaluate domain by domain into WHERE.part/, then write WHERE: a run stopped midway (a
    session's end) keeps its finished domains, and the rerun evaluates only the rest. Parts
    are reused only under the same model files, settings and questions (`key.json`)."""
    import shutil

    from sts.cache import fingerprint  # the extraction cache's model identity
    from sts.engine.evaluation import Evaluation

    parts = where.with_name(where.name + ".part")
    digest = settings_key({"model": fingerprint(model), "settings": settings,
                           "questions": {d: [e.uid for e in q] for d, q in groups.items()}})
    try:
        if json.loads((parts / "key.json").read_text())["digest"] != digest:
            shutil.rmtree(parts)
    except (OSError, ValueError, KeyError):
        shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / "key.json").write_text(json.dumps({"digest": digest}) + "\n")
    lm, merged = None, None
    for i, (domain, questions) in enumerate(groups.items()):
        part = parts / f"{i:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', domain)}"
        if (part / files.ACCURACY).is_file():
            ev = Evaluation.load(part)
            progress(f"[validate]   {domain}: reused ({len(ev.results)} questions)")
        else:
            lm = lm or load()
            ev = run(lm, {domain: questions})
            ev.save(part)
        if merged is None:
            merged = ev
        else:
            merged.results += ev.results
    assert merged is not None
    merged.save(where)
    shutil.rmtree(parts)


def train_dir_name(i: int, ds: Dataset) -> str:
    """train-K-NAME: the order given, and a readable name of the spec."""
    stem = Path(ds.spec.split("#")[0]).stem if not ds.spec.startswith("embedded:") else ds.spec.split(":", 1)[1]
    sel = ds.spec.split("#", 1)[1].split("=", 1)[-1] if "#" in ds.spec else ""
    name = re.sub(r"[^A-Za-z0-9]+", "-", f"{stem}-{sel}" if sel else stem).strip("-")[:40]
    return f"train-{i + 1}-{name}"


# --- the stages and what keys them ----------------------------------------------------------------

@dataclass
class Plan:
    """What every stage of one validation shares: the config (model and SAE resolved), the
    data, and each kind of stage's settings (the JSON whose hash keys it: every option that
    changes its outputs, and the ids of its examples)."""

    cfg: ValidateConfig
    inputs: Inputs
    demos: DomainDemos
    predict_domains: dict[str, list[Example]]
    eval_domains: dict[str, list[Example]]

    @property
    def extra(self) -> dict[str, Any]:
        """Settings that change every stage's outputs but were not in the keys of the first
        runs: recorded only away from those runs' values, so that their stages still verify."""
        dtype = self.cfg.placement.describe()["dtype"]  # statistics in another precision are others
        return {} if dtype == "float32" else {"dtype": dtype}

    def evaluation(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "questions": {d: [e.uid for e in q] for d, q in self.eval_domains.items()},
                "shots": c.shots, "likelihoods": c.likelihoods} | self.extra

    def reference(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "records": {d: [e.uid for e in q] for d, q in self.inputs.reference.items()},
                "spec": self.cfg.reference} | self.extra

    def prediction(self, train: Dataset) -> dict[str, Any]:
        from sts.engine.gradients import first_step_key

        c = self.cfg
        # the scores computed are part of the key: a release that adds one recomputes these stages
        # (from the extraction cache) instead of reusing files that lack it
        first = {} if c.first_token == defaults.PREDICT_FIRST_TOKEN else {"first_token": c.first_token}
        return {"train": [asdict(e) for e in train.examples], "sae": c.sae, "model": c.model, "k": c.k,
                "demos": c.demos, "seed": c.seed, "max_length": c.max_length, "score": c.score,
                "scores": [list(c.icl_scores), list(shift_scores())],
                "questions": {d: [e.uid for e in q] for d, q in self.predict_domains.items()},
                "domain_demos": self.demos.describe()} | first | self.extra | (
                    {"gradients": first_step_key(c.finetune)} if c.gradients else {}) | (
                    {"gradient_loss": "content"} if self.gradient_content else {}) | (
                    {"probes": self.inputs.probes.describe()} if self.inputs.probes else {})

    def sides(self) -> dict[str, str]:
        """What each score's domain side read (`library.side_label`): the gradient scores their
        probe records (the ground truth's loss), every other score the domain questions."""
        c, probes = self.cfg, self.inputs.probes
        return {s: library.side_label(True, probes.source, (e for q in probes.probes.values() for e in q))
                if s in gradient_scores() and probes else
                library.side_label(False, c.domains, ()) for s in c.icl_scores}

    @property
    def gradient_content(self) -> bool:
        """Whether the gradient scores' domain side takes cot_nll_content's loss: the loss the
        primary ground truth measures, on the reference records."""
        return self.cfg.metric == Metric.COT_NLL_CONTENT and bool(self.inputs.reference)

    def finetuning(self, train: Dataset) -> dict[str, Any]:
        return {"train": [asdict(e) for e in train.examples], "model": self.cfg.model,
                "spec": asdict(self.cfg.finetune)} | self.extra

    def stage_settings(self) -> dict[str, dict[str, Any]]:
        """Every stage's name and settings, as `validate` runs them (and keys their manifests)."""
        c = self.cfg
        out = {"evaluate base": self.evaluation()} if c.question_evaluation else {}
        if self.inputs.reference:
            out["evaluate base (reference)"] = self.reference()
        for i, train in enumerate(self.inputs.trains):
            names = stage_names(train_dir_name(i, train))
            out |= {names["icl"]: self.prediction(train), names["finetune"]: self.finetuning(train)}
            if c.question_evaluation:
                out[names["evaluate"]] = self.evaluation() | {"model": "tuned"}
            if c.sft_shift:
                out[names["sft"]] = self.prediction(train)
            if self.inputs.reference:
                out[names["reference"]] = self.reference() | {"model": "tuned"}
        return out

    def load(self, model: str) -> Any:
        from sts.engine.models import load_model

        p = self.cfg.placement
        return load_model(model, p.dtype, p.device, p.device_map)

    def predict_config(self, train: Dataset, method: Method, tuned: Path) -> Any:
        from sts.prediction.config import PredictConfig

        c = self.cfg
        return PredictConfig(model=c.model, sae=c.sae, train=train.spec, domains=c.domains, method=method,
                             tuned_model=str(tuned) if method == "sft" else None, k=c.k, demos=c.demos, seed=c.seed,
                             max_train=len(train.examples), max_examples=c.predict_examples, max_length=c.max_length,
                             batch_size=c.batch_size, batch_tokens=c.batch_tokens, placement=c.placement,
                             use_cache=c.use_cache, score=c.score, first_token=c.first_token,
                             domain_demos=c.domain_demos, domain_demos_n=c.domain_demos_n, finetune=c.finetune,
                             gradient_content=self.gradient_content)


def stage_names(set_name: str) -> dict[str, str]:
    """The names of one training set's stages (its manifests are stages/NAME.json)."""
    return {"icl": f"{set_name}: predict (icl)", "finetune": f"{set_name}: finetune",
            "evaluate": f"{set_name}: evaluate tuned", "sft": f"{set_name}: predict (sft)",
            "reference": f"{set_name}: evaluate tuned (reference)"}


def plan(cfg: ValidateConfig) -> Plan:
    """Resolve the embedded model and SAE, check that they pair, and read the data."""
    from sts.data.embedded import default_sae_dir
    from sts.engine.extract import check_fits
    from sts.engine.models import default_model_dir, parse_hook_name
    from sts.engine.saes import load_sae

    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir()), sae=cfg.sae or str(default_sae_dir()))
    loaded = load_sae(cfg.sae)  # a bad SAE/model pair fails before any data is read
    check_fits(loaded, parse_hook_name(loaded.hook_name), cfg.model)
    return plan_data(cfg)


def plan_data(cfg: ValidateConfig) -> Plan:
    """The Plan of a config whose model and SAE are given: the data read, nothing loaded."""
    inputs = read_inputs(cfg)
    demos, domains = domain_demonstrations(inputs.domains, cfg.domain_demos_n, cfg.domain_demos)
    return Plan(cfg, inputs, demos, {d: q[: cfg.predict_examples] for d, q in domains.items()},
                {d: q[: cfg.eval_examples + cfg.shots] for d, q in domains.items()})


def run_evaluation(pl: Plan, stages: Stages, name: str, model: str, where: Path, inputs: list[Path],
                   reference: bool = False, tuned: bool = False) -> None:
    """One evaluation stage: the domain questions (every metric), or the reference records (cot_nll)."""
    from sts.engine.evaluation import evaluate

    c = pl.cfg
    groups, settings = (pl.inputs.reference, pl.reference()) if reference else (pl.eval_domains, pl.evaluation())
    part_settings = {"mode": "reference"} if reference else {"shots": c.shots, "likelihoods": c.likelihoods}

    def one(lm: Any, part: dict[str, list[Example]]) -> Any:
        if reference:
            return evaluate(lm, part, mode="reference", batch_tokens=c.batch_tokens)
        return evaluate(lm, part, shots=c.shots, batch_size=c.batch_size or defaults.EVAL_BATCH,
                        likelihoods=c.likelihoods, batch_tokens=c.batch_tokens, show_progress=True)

    stages.run(name, [where], lambda: evaluate_in_parts(model, lambda: pl.load(model), where, groups, part_settings,
                                                        one, stages.progress),
               inputs, settings | ({"model": "tuned"} if tuned else {}))


def run_prediction(pl: Plan, train: Dataset, method: Method, tdir: Path, progress: Callable[[str], None]) -> None:
    """Every score of one shift (icl: all; sft: those over shifted features) from one extraction."""
    from sts.prediction import report
    from sts.prediction.extraction import extract_all
    from sts.prediction.predict import prediction
    from sts.prediction.session import Session

    scores = pl.cfg.icl_scores if method == "icl" else shift_scores()
    pcfg = pl.predict_config(train, method, tdir / "tuned")
    session = Session(pcfg, progress)
    # the gradient scores' domain side: the loss the primary ground truth measures, on probe records
    # that it does not measure (cot_nll_content: the tokens after the references' templated
    # openings, `Plan.gradient_content`)
    probes = pl.inputs.probes.probes if pl.inputs.probes else None
    extraction = extract_all(pcfg, train, pl.predict_domains, scores, pl.demos, progress, session, probes)
    preds = {s: prediction(pcfg, extraction, s, train, session) for s in scores}
    if pl.cfg.score in preds:
        report.write(preds[pl.cfg.score], tdir / f"predict-{method}")
    payload = {"train": train.spec, "method": method, "scores": {s: p.scores for s, p in preds.items()},
               "tokens": {s: p.tokens for s, p in preds.items()}, "truncation": preds[scores[0]].truncation}
    with atomic_path(tdir / f"scores-{method}.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")


def run_training_set(pl: Plan, stages: Stages, i: int, train: Dataset, model_files: list[Path]) -> dict[str, Any]:
    """predict (icl) -> finetune -> evaluate tuned -> predict (sft) [-> evaluate tuned on the
    reference records]: the stages of one training set, each skipped where it verifies."""
    from sts.engine.evaluation import Evaluation
    from sts.engine.finetuning import finetune

    c, name = pl.cfg, train_dir_name(i, train)
    stage = stage_names(name)
    tdir = pl.cfg.out / name
    tuned = tdir / "tuned"
    predict_settings = pl.prediction(train)
    icl_out = [tdir / "scores-icl.json"] + ([tdir / "predict-icl"] if c.score in c.icl_scores else [])
    stages.run(stage["icl"], icl_out, lambda: run_prediction(pl, train, Method.ICL, tdir, stages.progress),
               model_files, predict_settings)
    stages.run(stage["finetune"], [tuned], lambda: finetune(pl.load(c.model), train.examples, c.finetune, tuned,
                                                            c.command, in_place=True), model_files,
               pl.finetuning(train))
    tuned_weights = list(tuned.glob("*.safetensors"))
    if c.question_evaluation:
        run_evaluation(pl, stages, stage["evaluate"], str(tuned), tdir / "eval-tuned", tuned_weights, tuned=True)
    if c.sft_shift:
        sft_out = [tdir / "scores-sft.json"] + ([tdir / "predict-sft"] if c.score in shift_scores() else [])
        stages.run(stage["sft"], sft_out, lambda: run_prediction(pl, train, Method.SFT, tdir, stages.progress),
                   tuned_weights, predict_settings)
    if pl.inputs.reference:
        run_evaluation(pl, stages, stage["reference"], str(tuned), tdir / "eval-tuned-reference",
                       tuned_weights, reference=True, tuned=True)
    return {"spec": train.spec, "dir": tdir,
            "eval": Evaluation.load(tdir / "eval-tuned") if c.question_evaluation else None,
            "scores": {m: json.loads((tdir / f"scores-{m}.json").read_text())["scores"] for m in c.shifts}}


# --- the loop ------------------------------------------------------------------------------------

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


def validate(cfg: ValidateConfig, progress: Callable[[str], None] = lambda _m: None) -> ValidationResult:
    """Per training set: predict (icl) -> finetune -> evaluate -> predict (sft); then the
    transfer matrix and its correlations. Stages already done are verified and reused."""
    from sts.engine.evaluation import Evaluation

    started = time.perf_counter()
    pl = plan(cfg)
    cfg = pl.cfg
    protocols = [p for p in Protocol if p is not Protocol.PAPER or len(pl.inputs.domains) >= PAPER_DOMAINS]
    if cfg.protocol not in protocols:
        raise UserError(f"the {cfg.protocol} protocol needs {PAPER_DOMAINS} domains (there are "
                        f"{len(pl.inputs.domains)}); use --protocol signed or abs")
    cfg.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    stages = Stages(cfg.out, timings, progress)
    model_files = sorted(Path(cfg.model).glob("*.safetensors")) if Path(cfg.model).is_dir() else []
    if cfg.question_evaluation:
        run_evaluation(pl, stages, "evaluate base", cfg.model, cfg.out / "eval-base", model_files)
    if pl.inputs.reference:
        run_evaluation(pl, stages, "evaluate base (reference)", cfg.model, cfg.out / "eval-base-reference",
                       model_files, reference=True)
    per_train = {train_dir_name(i, t): run_training_set(pl, stages, i, t, model_files)
                 for i, t in enumerate(pl.inputs.trains)}
    progress("[validate] correlations")  # cheap: always recomputed from the stages' outputs
    base_ref = Evaluation.load(cfg.out / "eval-base-reference") if pl.inputs.reference else None
    base = Evaluation.load(cfg.out / "eval-base") if cfg.question_evaluation else None
    changes, metrics = measured_changes(cfg, base, base_ref, per_train)
    rows = per_set_correlations(cfg, per_train, changes, metrics, protocols)
    matrix_rows = matrix_correlations(cfg, per_train, changes, metrics)
    swap, own = swap_rows(cfg, per_train, changes, metrics), own_domain_rows(cfg, pl, per_train, changes)
    library.from_validation(cfg.out, per_train, changes, cfg.sae, cfg.model, cfg.k, cfg.metric, pl.sides()).save(
        cfg.out / "library.json")  # for `sts predict --library`: shared and own parts
    write_matrices(cfg.out, per_train, changes, metrics)
    write_correlations(cfg.out, rows, matrix_rows)
    first = next(iter(per_train))
    comparison = [r for r in rows if r["train"] == first and r["metric"] == cfg.metric]
    write_comparison(comparison, cfg.out)
    heatmaps(cfg.out, per_train, changes, cfg.score, cfg.metric)
    timings["total"] = round(time.perf_counter() - started, 1)
    primary = {r["shift"]: r for r in comparison if r["score"] == cfg.score and r["protocol"] == cfg.protocol}
    results = ValidationResult(
        correlations=primary, per_train=rows, matrix=matrix_rows,
        signal=[{"train": t, "metric": m, **co.signal(changes[t][m])} for t in per_train for m in metrics],
        comparison=comparison, budget=budget(pl, per_train, metrics), timings_s=timings,
        stages_reused=stages.reused, cells=cells(cfg, per_train, changes, metrics), command=cfg.command,
        swap=swap, own_domain=own)
    write_results(cfg.out, results)
    return results


# --- the analysis (from the stages' outputs) --------------------------------------------------------

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
                resample = co.load_sts(sts_json)[1] if score_name == cfg.score and sts_json.is_file() else None
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
                            co.write(corr, values, changes[t][metric], info["dir"], f"correlation-{method}",
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


def write_results(out: Path, results: ValidationResult) -> None:
    """results.json (every field), results.csv (the cells), swap.csv and own-domain.csv."""
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(asdict(results), indent=1) + "\n")
    header = list(dict.fromkeys(h for c in results.cells for h in c))
    write_csv(out / "results.csv", header, ([c.get(h, "") for h in header] for c in results.cells), line_end="\n")
    if results.swap:
        write_csv(out / "swap.csv", ["shift", "score", "baseline", "metric", "sets", "domains", "own", "own_lo",
                                     "own_hi", "other", "other_lo", "other_hi", "difference", "difference_lo",
                                     "difference_hi"],
                  ([r["shift"], r["score"], r["baseline"], r["metric"], r["sets"], r["domains"],
                    *(f"{v:.4f}" for v in (r["own"], *r["own_ci"], r["other"], *r["other_ci"], r["difference"],
                                           *r["difference_ci"]))] for r in results.swap))
    if results.own_domain:
        keys = ["train", "domain", "score", "baseline", "metric", "score_rank", "change_rank", "domains"]
        write_csv(out / "own-domain.csv", keys, ([r[k] for k in keys] for r in results.own_domain))


# --- tables and figures --------------------------------------------------------------------------

def write_matrices(out: Path, per_train: dict[str, dict[str, Any]], changes: Changes, metrics: list[str]) -> None:
    """matrices/score-SHIFT-SCORE.csv and matrices/change-METRIC.csv: training sets x the domains
    every set has (a score's own: the gradient scores may read the reference domains only)."""
    def shared(rows: list[dict[str, Any]]) -> list[str]:
        return sorted(set.intersection(*(set(r) for r in rows)))

    first = next(iter(per_train.values()))["scores"]
    tables: dict[str, tuple[list[str], dict[str, dict[str, float]]]] = {}
    for method in first:  # the shifts run
        for s in first[method]:
            values = {t: info["scores"][method][s] for t, info in per_train.items()}
            tables[f"score-{method}-{s}"] = (shared(list(values.values())), values)
    for metric in metrics:
        values = {t: {d: ch.delta for d, ch in changes[t][metric].items()} for t in per_train}
        tables[f"change-{metric}"] = (shared(list(values.values())), values)
    for name, (cols, values) in tables.items():
        write_csv(out / "matrices" / f"{name}.csv", ["train", *cols],
                  ([t, *(f"{values[t][d]:.6g}" for d in cols)] for t in per_train))


CORRELATION_COLUMNS = ["train", "shift", "score", "baseline", "metric", "protocol", "n", "pearson", "pearson_lo",
                       "pearson_hi", "spearman", "spearman_lo", "spearman_hi", "pearson_loo_min", "pearson_loo_max",
                       "domains_used"]


def _figures(r: dict[str, Any], loo: bool = True) -> list[str]:
    values = (r["pearson"], *r["pearson_ci"], r["spearman"], *r["spearman_ci"], *(r["pearson_loo"] if loo else ()))
    return [f"{v:.4f}" for v in values]


def write_correlations(out: Path, rows: list[dict[str, Any]], matrix_rows: list[dict[str, Any]]) -> None:
    """correlations.csv: one row per set (or pooled / specificity), shift, score, metric, protocol."""
    lines = [[r["train"], r["shift"], r["score"], r["baseline"], r["metric"], r["protocol"], r["domains"],
              *_figures(r), ";".join(r["domains_used"])] for r in rows]
    lines += [[r["train"], r["shift"], r["score"], r["baseline"], r["metric"], "signed", r["cells"], *_figures(r),
               "all cells" if r["kind"] == "pooled" else "all cells, double-centred"] for r in matrix_rows]
    write_csv(out / "correlations.csv", CORRELATION_COLUMNS, lines)


def signal_table(signals: list[dict[str, Any]]) -> str:
    """Per training set and metric: how far the changes spread across domains, over their noise."""
    lines = [f"{'train':<40} {'metric':<9} {'mean change':>11} {'spread':>9} {'sem':>9} {'signal':>7} {'top share':>9}"]
    for r in signals:
        lines.append(f"{r['train']:<40} {r['metric']:<9} {r['mean_change']:>11.4g} {r['spread']:>9.4g} "
                     f"{r['sem']:>9.4g} {r['signal']:>7.2f} {r['largest_share']:>9.2f}")
    return "\n".join(lines)


def comparison_table(comparison: list[dict[str, Any]]) -> str:
    """Every score and baseline under every protocol: Pearson with its 95% interval."""
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


def matrix_table(matrix_rows: list[dict[str, Any]], metric: str) -> str:
    """Pooled and specificity correlations per score, for one metric."""
    lines = [f"{'shift':<5} {'score':<8} {'pooled Pearson [95% CI]':<27} {'specificity Pearson [95% CI]':<27}"]
    for (shift, score) in dict.fromkeys((r["shift"], r["score"]) for r in matrix_rows if r["metric"] == metric):
        cells = []
        for kind in ("pooled", "specificity"):
            r = next((r for r in matrix_rows if (r["shift"], r["score"], r["metric"], r["kind"])
                      == (shift, score, metric, kind)), None)
            cells.append("-".ljust(27) if r is None else
                         f"{r['pearson']:+.2f} [{r['pearson_ci'][0]:+.2f}, {r['pearson_ci'][1]:+.2f}]".ljust(27))
        lines.append(f"{shift:<5} {score:<8} " + " ".join(cells))
    return "\n".join(lines)


def swap_table(swap: list[dict[str, Any]], metric: str) -> str:
    """The swap test per score (icl shift), for one metric: own, other and their difference."""
    lines = [f"{'score':<8} {'own [95% CI]':<22} {'other [95% CI]':<22} {'own - other [95% CI]':<22}"]
    for r in swap:
        if r["metric"] == metric and r["shift"] == "icl":
            lines.append(f"{r['score']:<8} " + " ".join(
                f"{r[k]:+.2f} [{r[k + '_ci'][0]:+.2f}, {r[k + '_ci'][1]:+.2f}]".ljust(22)
                for k in ("own", "other", "difference")))
    return "\n".join(lines)


def own_domain_table(rows: list[dict[str, Any]]) -> str:
    """Per set drawn from one domain: that domain's rank by each score, and by the change."""
    sets = list(dict.fromkeys((r["train"], r["domain"]) for r in rows))
    scores = list(dict.fromkeys(r["score"] for r in rows))
    lines = [f"{'train':<40} {'domain':<16} {'change':>6} " + " ".join(f"{s:>8}" for s in scores)]
    for t, d in sets:
        mine = {r["score"]: r for r in rows if r["train"] == t}
        first = next(iter(mine.values()))
        lines.append(f"{t:<40} {d:<16} {first['change_rank']:>3}/{first['domains']:<2} "
                     + " ".join(f"{mine[s]['score_rank']:>8}" if s in mine else f"{'-':>8}" for s in scores))
    return "\n".join(lines)


def write_comparison(comparison: list[dict[str, Any]], out: Path) -> None:
    """comparison.csv (one row per shift x score x protocol) and comparison.png (Pearson with
    its 95% interval, one panel per protocol, baselines in grey), for the first training set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_csv(out / "comparison.csv", ["shift", "score", "baseline", "metric", "protocol", "domains",
                                       *CORRELATION_COLUMNS[7:13], "domains_used"],
              ([c["shift"], c["score"], c["baseline"], c["metric"], c["protocol"], c["domains"],
                *_figures(c, loo=False), ";".join(c["domains_used"])] for c in comparison))
    protocols = list(dict.fromkeys(c["protocol"] for c in comparison))
    labels = list(dict.fromkeys(f"{c['score']} ({c['shift']})" for c in comparison))
    fig, axes = plt.subplots(1, len(protocols), figsize=(3.4 * len(protocols), 0.32 * len(labels) + 1.4),
                             sharey=True, squeeze=False)
    for ax, p in zip(axes[0], protocols):
        for i, label in enumerate(labels):
            c = next(c for c in comparison if f"{c['score']} ({c['shift']})" == label and c["protocol"] == p)
            lo, hi = c["pearson_ci"]
            if c["pearson"] == c["pearson"]:  # not nan
                ax.errorbar(c["pearson"], i, xerr=[[max(c["pearson"] - lo, 0)], [max(hi - c["pearson"], 0)]],
                            fmt="o", color="0.55" if c["baseline"] else "#3b6ea8", ms=4, capsize=2)
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


def heatmaps(out: Path, per_train: dict[str, dict[str, Any]],
             changes: dict[str, dict[str, dict[str, co.DomainChange]]], score: str, metric: str) -> None:
    """heatmaps.png: the primary score and the metric's change, raw and double-centred;
    specificity.png: the double-centred cells against each other (2+ training sets)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sts.engine.evaluation import UNITS

    trains = list(per_train)
    domains = sorted(set.intersection(*(set(changes[t][metric]) for t in trains)))
    x = np.array([[per_train[t]["scores"]["icl"][score][d] for d in domains] for t in trains])
    y = np.array([[changes[t][metric][d].delta for d in domains] for t in trains])
    panels = [(x, f"{score} (icl shift)"), (y, f"{metric} change ({UNITS[metric]})")]
    if len(trains) > 1:
        panels += [(co.double_centre(x), f"{score}, double-centred"),
                   (co.double_centre(y), f"{metric} change, double-centred")]
    size = (0.55 * len(domains) + 3, (0.35 * len(trains) + 1.3) * len(panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=size, squeeze=False)
    for ax, (m, title) in zip(axes[:, 0], panels):
        lim = np.abs(m).max() or 1.0
        im = ax.imshow(m, cmap="RdBu_r" if "centred" in title or "change" in title else "viridis",
                       vmin=-lim if "centred" in title or "change" in title else None,
                       vmax=lim if "centred" in title or "change" in title else None, aspect="auto")
        ax.set_yticks(range(len(trains)), trains, fontsize=6)
        ax.set_xticks(range(len(domains)), domains, fontsize=6, rotation=60, ha="right")
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    with atomic_path(out / "heatmaps.png") as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    if len(trains) < 2:
        return
    xc, yc = co.double_centre(x).ravel(), co.double_centre(y).ravel()
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, t in enumerate(trains):
        ax.scatter(xc[i * len(domains):(i + 1) * len(domains)], yc[i * len(domains):(i + 1) * len(domains)],
                   s=18, label=t)
    r = np.corrcoef(xc, yc)[0, 1] if np.ptp(xc) > 0 and np.ptp(yc) > 0 else float("nan")
    ax.set_title(f"specificity: double-centred cells, Pearson {r:+.2f}", fontsize=9)
    ax.set_xlabel(f"{score}, training-set and domain means removed", fontsize=8)
    ax.set_ylabel(f"{metric} change, means removed", fontsize=8)
    ax.axhline(0, color="grey", lw=0.6, ls=":")
    ax.axvline(0, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(out / "specificity.png") as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
