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
found in any training set is left out of every domain (`sts.data.decontaminate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sts import correlation as co
from sts import files
from sts.choices import Method, Metric, Protocol, Score, parse
from sts.data import Dataset, Example, domain_demonstrations
from sts.embedded import DEFAULT_DOMAINS, DEFAULT_TRAIN, file_sha256
from sts.errors import UserError, check_positive
from sts.files import atomic_path
from sts.finetuning import FinetuneSpec
from sts.models import Placement
from sts.score import BASELINES

# Cosine and lexical do not depend on the shifted features: computed with the icl shift only.
SFT_SCORES = ("act", "icl", "sq", "rel-act", "rel-icl", "raw-act", "raw-sq")


@dataclass
class ValidateConfig:
    """One `sts validate` run. Every rule between fields is checked once, here; the data
    (training sets, domain questions, reference records) is read by `validate`."""

    out: Path = Path("validate")
    train: list[str] = field(default_factory=lambda: [DEFAULT_TRAIN])  # one or more training sets
    model: str = ""  # "": the embedded SmolLM2-135M-Instruct
    sae: str = ""  # "": the embedded SAE
    domains: str = DEFAULT_DOMAINS
    exclude: list[str] = field(default_factory=list)  # datasets whose questions are left out too
    max_train: int = 200  # training examples (shift and fine-tuning)
    k: int = 100
    demos: int = 2
    seed: int = 0
    predict_examples: int = 100  # questions per domain for STS
    eval_examples: int = 100  # questions per domain for the ground truth
    max_length: int = 1024
    batch_size: int | None = None  # cap on sequences per forward pass (None: --batch-tokens decides)
    batch_tokens: int = 4096
    placement: Placement = field(default_factory=Placement)
    shots: int = 0
    replicates: int = 1000
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    use_cache: bool = True
    command: str = ""
    score: Score = Score.SQ  # the primary score (figures, predict-*/ folders)
    protocol: Protocol = Protocol.SIGNED  # the primary protocol
    metric: Metric = Metric.ACC  # the primary ground-truth metric
    domain_demos: str | None = None
    domain_demos_n: int = 5
    likelihoods: bool = True  # measure nll, acc_norm, p_correct, cot_nll too
    # cot_nll's ground truth: records with a reference chain of thought per domain (held out of
    # every training set), evaluated in mode `reference` beside the multiple-choice questions
    reference: str | None = None
    reference_examples: int = 100  # reference records per domain

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.score = parse(Score, self.score, "--score")
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
                        "--reference-examples": self.reference_examples})
        self.placement.resolved()  # a bad device or dtype fails here, in one line


@dataclass
class Inputs:
    """The data a validation reads: the training sets, the domain questions (every training
    set's questions left out, and any --exclude dataset's), the reference records."""

    trains: list[Dataset]
    domains: dict[str, list[Example]]
    excluded: dict[str, int]  # per domain: questions left out (contamination)
    reference: dict[str, list[Example]]


def read_inputs(cfg: ValidateConfig) -> Inputs:
    from sts.data import clean_questions, load_dataset

    trains = [load_dataset(t, max_examples=cfg.max_train) for t in cfg.train]
    seen = tuple(e for t in trains for e in t.examples)
    # demonstrations (domain_demos_n) are left out of the domains' questions
    per_domain = max(cfg.predict_examples, cfg.eval_examples + cfg.shots) + cfg.domain_demos_n
    groups, removed = clean_questions(cfg.domains, cfg.exclude, per_domain, examples=seen)
    references: dict[str, list[Example]] = {}
    if cfg.reference:
        records, _ = clean_questions(cfg.reference, [], None, examples=seen)
        references = {d: kept for d, q in records.items() if (kept := [e for e in q if e.cot][:cfg.reference_examples])}
        if not references:
            raise UserError(f"--reference {cfg.reference}: no record with a reference chain of thought (cot_content) "
                            "is left; give MMLU-Pro-style records with cot_content")
    return Inputs(trains, groups, removed, references)


# --- resumable stages --------------------------------------------------------------------------

def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return out


class Stages:
    """Runs named stages once: a stage is skipped when its manifest lists outputs that all
    exist with the recorded sha256 and inputs whose sha256 did not change."""

    def __init__(self, out: Path, timings: dict[str, float], progress: Callable[[str], None]):
        self.dir, self.timings, self.progress = out / "stages", timings, progress
        self.reused: list[str] = []

    def _manifest(self, name: str) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".json")

    def done(self, name: str, outputs: list[Path], inputs: list[Path], key: str = "") -> bool:
        path = self._manifest(name)
        try:
            m = json.loads(path.read_text())
            files = _files(outputs)
            return (bool(files) and m["key"] == key
                    and m["outputs"] == {str(p): file_sha256(p) for p in files}
                    and m["inputs"] == {str(p): file_sha256(p) for p in _files(inputs)})
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def run(self, name: str, outputs: list[Path], fn: Callable[[], None], inputs: Sequence[Path] = (),
            settings: Any = None) -> None:
        """Run `fn` unless a verified manifest says it ran with the same `settings` (a JSON
        value: the stage's options and the ids of its examples), inputs and outputs."""
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        if self.done(name, outputs, list(inputs), key):
            self.reused.append(name)
            self.progress(f"[validate] {name}: reused (outputs verified)")
            return
        self.progress(f"[validate] {name}")
        started = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - started, 1)
        manifest = {"key": key, "outputs": {str(p): file_sha256(p) for p in _files(outputs)},
                    "inputs": {str(p): file_sha256(p) for p in _files(list(inputs))},
                    "seconds": self.timings[name]}
        with atomic_path(self._manifest(name)) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        self.progress(f"[validate] {name} done in {self.timings[name]:.0f} s")


def evaluate_in_parts(model: str, load: Callable[[], Any], where: Path, groups: dict[str, list[Example]],
                      settings: dict[str, Any], run: Callable[[Any, dict[str, list[Example]]], Any],
                      progress: Callable[[str], None] = lambda _m: None) -> None:
    """Evaluate domain by domain into WHERE.part/, then write WHERE: a run stopped midway (a
    session's end) keeps its finished domains, and the rerun evaluates only the rest. Parts
    are reused only under the same model files, settings and questions (`key.json`)."""
    import shutil

    from sts.cache import fingerprint  # the extraction cache's model identity
    from sts.evaluation import Evaluation

    parts = where.with_name(where.name + ".part")
    key = {"model": fingerprint(model), "settings": settings,
           "questions": {d: [e.uid for e in q] for d, q in groups.items()}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
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


def validate(cfg: ValidateConfig, progress: Callable[[str], None] = lambda _m: None) -> ValidationResult:
    """Per training set: predict (icl) -> finetune -> evaluate -> predict (sft); then the
    transfer matrix and its correlations. Stages already done are verified and reused."""
    from sts import report
    from sts.embedded import default_sae_dir
    from sts.evaluation import METRICS, Evaluation, evaluate
    from sts.extract import check_fits
    from sts.finetuning import finetune
    from sts.models import default_model_dir, load_model, parse_hook_name
    from sts.prediction import PredictConfig, Session, extract_all, prediction
    from sts.saes import load_sae
    from sts.score import SCORES

    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir()), sae=cfg.sae or str(default_sae_dir()))
    loaded = load_sae(cfg.sae)  # a bad SAE/model pair fails before any data is read
    check_fits(loaded, parse_hook_name(loaded.hook_name), cfg.model)
    inputs = read_inputs(cfg)
    domains = inputs.domains
    timings: dict[str, float] = {}
    protocols = [p for p in co.PROTOCOLS if p != "paper" or len(domains) >= 8]
    if cfg.protocol not in protocols:
        raise UserError(f"the {cfg.protocol} protocol is unknown or needs 8 domains (there are "
                        f"{len(domains)}); use --protocol signed or abs")
    started = time.perf_counter()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, timings, progress)
    demos, domains = domain_demonstrations(domains, cfg.domain_demos_n, cfg.domain_demos)
    predict_domains = {d: exs[: cfg.predict_examples] for d, exs in domains.items()}
    eval_domains = {d: exs[: cfg.eval_examples + cfg.shots] for d, exs in domains.items()}
    model_files = [p for p in Path(cfg.model).glob("*.safetensors")] if Path(cfg.model).is_dir() else []

    p = cfg.placement

    def load(model: str) -> Any:
        return load_model(model, p.dtype, p.device, p.device_map)

    def evaluate_to(model: str, where: Path) -> None:
        settings = {"shots": cfg.shots, "likelihoods": cfg.likelihoods}
        in_parts(model, where, eval_domains, settings, lambda lm, part: evaluate(
            lm, part, shots=cfg.shots, batch_size=cfg.batch_size or 8, likelihoods=cfg.likelihoods,
            batch_tokens=cfg.batch_tokens, show_progress=True))

    def in_parts(model: str, where: Path, groups: dict[str, list[Example]], settings: dict[str, Any],
                 run: Callable[[Any, dict[str, list[Example]]], Evaluation]) -> None:
        evaluate_in_parts(model, lambda: load(model), where, groups, settings, run, progress)

    questions = {d: [e.uid for e in q] for d, q in eval_domains.items()}
    eval_settings = {"model": cfg.model, "questions": questions, "shots": cfg.shots,
                     "likelihoods": cfg.likelihoods}
    stages.run("evaluate base", [out / "eval-base"], lambda: evaluate_to(cfg.model, out / "eval-base"),
               model_files, eval_settings)
    base_eval = Evaluation.load(out / "eval-base")

    def reference_to(model: str, where: Path) -> None:
        in_parts(model, where, inputs.reference, {"mode": "reference"}, lambda lm, part: evaluate(
            lm, part, mode="reference", batch_tokens=cfg.batch_tokens))

    reference_settings = {"model": cfg.model, "records": {d: [e.uid for e in q] for d, q in inputs.reference.items()},
                          "spec": cfg.reference}
    if inputs.reference:
        stages.run("evaluate base (reference)", [out / "eval-base-reference"],
                   lambda: reference_to(cfg.model, out / "eval-base-reference"), model_files, reference_settings)

    per_train: dict[str, dict[str, Any]] = {}
    for i, train in enumerate(inputs.trains):
        name = train_dir_name(i, train)
        tdir = out / name
        tuned_dir = tdir / "tuned"

        def predict_all(method: Method, train: Dataset = train, tdir: Path = tdir, tuned_dir: Path = tuned_dir) -> None:
            scores = SCORES if method == "icl" else SFT_SCORES
            pcfg = PredictConfig(model=cfg.model, sae=cfg.sae, train=train.spec, domains=cfg.domains,
                                 method=method, tuned_model=str(tuned_dir) if method == "sft" else None,
                                 k=cfg.k, demos=cfg.demos, seed=cfg.seed, max_train=len(train.examples),
                                 max_examples=cfg.predict_examples, max_length=cfg.max_length,
                                 batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, placement=p,
                                 use_cache=cfg.use_cache, score=cfg.score,
                                 domain_demos=cfg.domain_demos, domain_demos_n=cfg.domain_demos_n)
            session = Session(pcfg, progress)
            extraction = extract_all(pcfg, train, predict_domains, scores, demos, progress, session)
            preds = {s: prediction(pcfg, extraction, s, train, session) for s in scores}
            payload = {"train": train.spec, "method": method, "scores": {s: p.scores for s, p in preds.items()},
                       "tokens": {s: p.tokens for s, p in preds.items()},
                       "truncation": preds[scores[0]].truncation}
            if cfg.score in preds:
                report.write(preds[cfg.score], tdir / f"predict-{method}")
            with atomic_path(tdir / f"scores-{method}.json") as tmp:
                tmp.write_text(json.dumps(payload, indent=1) + "\n")

        def tune(train: Dataset = train, tuned_dir: Path = tuned_dir) -> None:
            finetune(load(cfg.model), train.examples, cfg.finetune, tuned_dir, cfg.command, in_place=True)

        examples = [asdict(e) for e in train.examples]
        # the scores computed are part of the key: a release that adds one recomputes these stages
        # (from the extraction cache) instead of reusing files that lack it
        predict_settings = {"train": examples, "sae": cfg.sae, "model": cfg.model, "k": cfg.k, "demos": cfg.demos,
                            "seed": cfg.seed, "max_length": cfg.max_length, "score": cfg.score,
                            "scores": [list(SCORES), list(SFT_SCORES)],
                            "questions": {d: [e.uid for e in q] for d, q in predict_domains.items()},
                            "domain_demos": demos.describe()}
        icl_out = [tdir / "scores-icl.json"] + ([tdir / "predict-icl"] if cfg.score in SCORES else [])
        stages.run(f"{name}: predict (icl)", icl_out, lambda: predict_all(Method.ICL), model_files, predict_settings)
        stages.run(f"{name}: finetune", [tuned_dir], tune, model_files,
                   {"train": examples, "model": cfg.model, "spec": asdict(cfg.finetune)})
        tuned_weights = list(tuned_dir.glob("*.safetensors"))
        stages.run(f"{name}: evaluate tuned", [tdir / "eval-tuned"],
                   partial(evaluate_to, str(tuned_dir), tdir / "eval-tuned"),
                   tuned_weights, eval_settings | {"model": "tuned"})
        sft_out = [tdir / "scores-sft.json"] + ([tdir / "predict-sft"] if cfg.score in SFT_SCORES else [])
        stages.run(f"{name}: predict (sft)", sft_out, lambda: predict_all(Method.SFT), tuned_weights, predict_settings)
        if inputs.reference:
            stages.run(f"{name}: evaluate tuned (reference)", [tdir / "eval-tuned-reference"],
                       partial(reference_to, str(tuned_dir), tdir / "eval-tuned-reference"),
                       tuned_weights, reference_settings | {"model": "tuned"})
        per_train[name] = {"spec": train.spec, "dir": tdir,
                           "scores": {m: json.loads((tdir / f"scores-{m}.json").read_text())["scores"]
                                      for m in ("icl", "sft")},
                           "eval": Evaluation.load(tdir / "eval-tuned")}

    # --- analysis (cheap: always recomputed from the stages' outputs) ---
    progress("[validate] correlations")
    metrics: list[str] = [m for m in METRICS if any(r.value(m) is not None for r in base_eval.results)]
    if cfg.metric not in metrics + (["cot_nll"] if inputs.reference else []):
        raise UserError(f"metric {cfg.metric} was not measured on these questions (measured: {', '.join(metrics)}); "
                        "cot_nll needs --reference records with cot_content")
    changes = {t: {m: co.changes_from_evaluations(base_eval, info["eval"], m) for m in metrics}
               for t, info in per_train.items()}
    if inputs.reference:  # cot_nll from the held-out reference records, not the questions
        base_ref = Evaluation.load(out / "eval-base-reference")
        for t, info in per_train.items():
            changes[t]["cot_nll"] = co.changes_from_evaluations(
                base_ref, Evaluation.load(info["dir"] / "eval-tuned-reference"), "cot_nll")
        metrics = list(dict.fromkeys(metrics + ["cot_nll"]))
    rows: list[dict[str, Any]] = []
    first = next(iter(per_train))
    for t, info in per_train.items():
        for method, by_score in info["scores"].items():
            for score_name, values in by_score.items():
                resample = None
                if score_name == cfg.score:  # the primary score also resamples the training examples
                    _, resample = co.load_sts(info["dir"] / f"predict-{method}" / files.STS_JSON) \
                        if (info["dir"] / f"predict-{method}" / files.STS_JSON).is_file() else (None, None)
                for metric in metrics:
                    for protocol in protocols:
                        if protocol == "paper" and len(set(values) & set(changes[t][metric])) < 8:
                            continue  # e.g. cot_nll on fewer reference domains
                        corr = co.correlate(values, changes[t][metric], cfg.replicates, cfg.seed,
                                            resample if metric == cfg.metric and protocol == cfg.protocol else None,
                                            protocol, metric)
                        rows.append({"train": t, "shift": method, "score": score_name,
                                     "baseline": score_name in BASELINES, **asdict(corr)})
                        if (score_name, metric, protocol) == (cfg.score, cfg.metric, cfg.protocol):
                            co.write(corr, values, changes[t][metric], info["dir"], f"correlation-{method}",
                                     title=f"{score_name} ({method} shift) vs {metric} change: {info['spec']}",
                                     xlabel=score_name)
    matrix_rows: list[dict[str, Any]] = []
    for method in ("icl", "sft"):
        names = SCORES if method == "icl" else SFT_SCORES
        for score_name in names:
            matrix = {t: info["scores"][method][score_name] for t, info in per_train.items()}
            for metric in metrics:
                for kind in ("pooled", "specificity"):
                    if kind == "specificity" and len(per_train) < 2:
                        continue
                    mc = co.correlate_matrix(matrix, {t: changes[t][metric] for t in per_train}, kind,
                                             cfg.replicates, cfg.seed, metric)
                    matrix_rows.append({"train": kind, "shift": method, "score": score_name,
                                        "baseline": score_name in BASELINES, **asdict(mc)})
    signals = [{"train": t, "metric": m, **co.signal(changes[t][m])} for t in per_train for m in metrics]
    write_matrices(out, per_train, changes, metrics)
    write_correlations(out, rows, matrix_rows)
    write_comparison([r for r in rows if r["train"] == first and r["metric"] == cfg.metric], out)
    heatmaps(out, per_train, changes, cfg.score, cfg.metric)

    timings["total"] = round(time.perf_counter() - started, 1)
    cells = [{"train": t, "domain": d,
              **{f"{m}:{s}": info["scores"][m][s][d] for m in ("icl", "sft") for s in info["scores"][m]},
              **{f"change:{metric}": changes[t][metric][d].delta for metric in metrics if d in changes[t][metric]},
              "questions": changes[t][cfg.metric][d].questions if d in changes[t][cfg.metric] else ""}
             for t, info in per_train.items() for d in sorted(info["scores"]["icl"][cfg.score])]
    budget = {"model": cfg.model, "sae": cfg.sae, "domains": cfg.domains,
              "trains": {t: {"spec": info["spec"], "examples": len(inputs.trains[i].examples)}
                         for i, (t, info) in enumerate(per_train.items())},
              "k": cfg.k, "demos": cfg.demos, "score": cfg.score, "protocol": cfg.protocol,
              "metric": cfg.metric, "metrics": metrics, "domain_demonstrations": demos.describe(),
              "excluded_questions": inputs.excluded,
              "predict_questions_per_domain": cfg.predict_examples,
              "eval_questions_per_domain": cfg.eval_examples, "eval_mode": "mc", "shots": cfg.shots,
              "reference": {"spec": cfg.reference,
                            "records_per_domain": {d: len(q) for d, q in inputs.reference.items()}},
              "finetune": asdict(cfg.finetune), "bootstrap_replicates": cfg.replicates, "seed": cfg.seed}
    primary = {r["shift"]: r for r in rows if r["train"] == first and r["score"] == cfg.score
               and r["metric"] == cfg.metric and r["protocol"] == cfg.protocol}
    results = ValidationResult(
        correlations=primary, per_train=rows, matrix=matrix_rows, signal=signals,
        comparison=[r for r in rows if r["train"] == first and r["metric"] == cfg.metric],
        budget=budget, timings_s=timings, stages_reused=stages.reused, cells=cells, command=cfg.command)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(asdict(results), indent=1) + "\n")
    header = list(dict.fromkeys(h for c in cells for h in c))
    lines = [",".join(f'"{h}"' if "," in h else h for h in header)]
    lines += [",".join(f"{c[h]:.6g}" if isinstance(c.get(h), float) else str(c.get(h, "")) for h in header)
              for c in cells]
    with atomic_path(out / "results.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return results


# --- tables and figures --------------------------------------------------------------------------

def write_matrices(out: Path, per_train: dict[str, dict[str, Any]],
                   changes: dict[str, dict[str, dict[str, co.DomainChange]]], metrics: list[str]) -> None:
    """matrices/score-SHIFT-SCORE.csv and matrices/change-METRIC.csv: training sets x domains."""
    import csv
    import io

    def common(metric: str) -> list[str]:
        return sorted(set.intersection(*(set(c[metric]) for c in changes.values())))

    domains = sorted(set.intersection(*(set(info["scores"]["icl"][next(iter(info["scores"]["icl"]))])
                                        for info in per_train.values())))

    def write(name: str, value: Callable[[str, str], float], domains: list[str] = domains) -> None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["train", *domains])
        for t in per_train:
            w.writerow([t, *(f"{value(t, d):.6g}" for d in domains)])
        with atomic_path(out / "matrices" / f"{name}.csv") as tmp:
            tmp.write_text(buf.getvalue())

    for method in ("icl", "sft"):
        for score_name in per_train[next(iter(per_train))]["scores"][method]:
            def score_cell(t: str, d: str, m: str = method, s: str = score_name) -> float:
                return per_train[t]["scores"][m][s][d]

            write(f"score-{method}-{score_name}", score_cell)
    for metric in metrics:
        def change_cell(t: str, d: str, m: str = metric) -> float:
            return changes[t][m][d].delta

        write(f"change-{metric}", change_cell, common(metric))


def write_correlations(out: Path, rows: list[dict[str, Any]], matrix_rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["train", "shift", "score", "baseline", "metric", "protocol", "n", "pearson", "pearson_lo",
                "pearson_hi", "spearman", "spearman_lo", "spearman_hi", "pearson_loo_min", "pearson_loo_max",
                "domains_used"])
    for r in rows:
        w.writerow([r["train"], r["shift"], r["score"], r["baseline"], r["metric"], r["protocol"], r["domains"],
                    *(f"{v:.4f}" for v in (r["pearson"], *r["pearson_ci"], r["spearman"], *r["spearman_ci"],
                                           *r["pearson_loo"])),
                    ";".join(r["domains_used"])])
    for r in matrix_rows:
        w.writerow([r["train"], r["shift"], r["score"], r["baseline"], r["metric"], "signed", r["cells"],
                    *(f"{v:.4f}" for v in (r["pearson"], *r["pearson_ci"], r["spearman"], *r["spearman_ci"],
                                           *r["pearson_loo"])),
                    "all cells" if r["kind"] == "pooled" else "all cells, double-centred"])
    with atomic_path(out / "correlations.csv") as tmp:
        tmp.write_text(buf.getvalue())


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


def write_comparison(comparison: list[dict[str, Any]], out: Path) -> None:
    """comparison.csv (one row per shift x score x protocol) and comparison.png (Pearson with
    its 95% interval, one panel per protocol, baselines in grey), for the first training set."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["shift", "score", "baseline", "metric", "protocol", "domains", "pearson", "pearson_lo",
                "pearson_hi", "spearman", "spearman_lo", "spearman_hi", "domains_used"])
    for c in comparison:
        w.writerow([c["shift"], c["score"], c["baseline"], c["metric"], c["protocol"], c["domains"],
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

    from sts.evaluation import UNITS

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
