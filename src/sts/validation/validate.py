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

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sts import defaults, files
from sts.analysis import correlation as co
from sts.analysis import library
from sts.choices import PAPER_DOMAINS, Method, Protocol
from sts.data.examples import Dataset, Example
from sts.engine.distributed import agree, barrier, world
from sts.errors import UserError
from sts.files import atomic_path
from sts.scores.score import shift_scores
from sts.validation.config import ValidateConfig
from sts.validation.outcome import (
    ValidationResult,
    budget,
    cells,
    matrix_correlations,
    measured_changes,
    own_domain_rows,
    per_set_correlations,
    swap_rows,
)
from sts.validation.plan import Plan, Step, plan, train_dir_name
from sts.validation.stages import Later, Stages, settings_key
from sts.validation.write import heatmaps, write_comparison, write_correlations, write_matrices, write_results


def evaluate_in_parts(model: str, load: Callable[[], Any], where: Path, groups: dict[str, list[Example]],
                      settings: dict[str, Any], run: Callable[[Any, dict[str, list[Example]]], Any],
                      progress: Callable[[str], None] = lambda _m: None) -> None:
    """Evaluate domain by domain into WHERE.part/, then write WHERE: a run stopped midway (a
    session's end) keeps its finished domains, and the rerun evaluates only the rest. Parts
    are reused only under the same model files, settings and questions (`key.json`)."""
    import shutil

    from sts.cache import fingerprint  # the extraction cache's model identity
    from sts.engine.evaluation import Evaluation

    w = world()  # under several processes each evaluates a share of each domain; the main one writes
    parts = where.with_name(where.name + ".part")
    digest = settings_key({"model": fingerprint(model), "settings": settings,
                           "questions": {d: [e.uid for e in q] for d, q in groups.items()}})
    if w.main:
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
        if agree(("reuse",) if w.main and (part / files.ACCURACY).is_file() else (), w):
            if not w.main:
                continue
            ev = Evaluation.load(part)
            progress(f"[validate]   {domain}: reused ({len(ev.results)} questions)")
        else:
            lm = lm or load()
            ev = run(lm, {domain: questions})
            if w.main:
                ev.save(part)
        if merged is None:
            merged = ev
        else:
            merged.results += ev.results
    if w.main:
        assert merged is not None
        merged.save(where)
        shutil.rmtree(parts)


def run_evaluation(pl: Plan, stages: Stages, step: Step, model: str, where: Path, inputs: list[Path],
                   read: dict[str, str] | None = None) -> None:
    """One evaluation stage: the domain questions (every metric), or the reference records (cot_nll);
    under several processes each evaluates its share of every domain (`evaluation.shared`)."""
    from sts.engine.evaluation import evaluate, shared

    c = pl.cfg
    reference = step.kind == "reference"
    groups = pl.inputs.reference if reference else pl.eval_domains
    part_settings = {"mode": "reference"} if reference else {"shots": c.shots, "likelihoods": c.likelihoods}

    def one(lm: Any, part: dict[str, list[Example]]) -> Any:
        if reference:
            return shared(lambda mine: evaluate(lm, mine, mode="reference", batch_tokens=c.batch_tokens), part)
        return shared(lambda mine: evaluate(lm, mine, shots=c.shots, batch_size=c.batch_size or defaults.EVAL_BATCH,
                                            likelihoods=c.likelihoods, batch_tokens=c.batch_tokens,
                                            show_progress=True), part, c.shots)

    stages.run(step.name, [where], lambda: evaluate_in_parts(model, lambda: pl.load(model), where, groups,
                                                             part_settings, one, stages.progress),
               inputs, step.settings, read)


def run_finetune(pl: Plan, stages: Stages, step: Step, train: Dataset, tuned: Path, model_files: list[Path],
                 later: list[Later], command: str) -> dict[str, str] | None:
    """One fine-tuning stage into `tuned`. `tuned/` is not committed: on a new machine the adapter is
    gone, and it is rebuilt only where a `later` stage still needs it (`Stages.consumed`); where none
    does, the adapter's recorded hashes, which the later stages verify against (None otherwise)."""
    from sts.engine.finetuning import finetune

    read = stages.consumed(step.name, model_files, step.settings, later,
                           lambda p: Path(p).parent == tuned and p.endswith(".safetensors"))  # tuned/*.safetensors
    if read is None:
        stages.run(step.name, [tuned], lambda: finetune(pl.load(pl.cfg.model), train.examples, pl.cfg.finetune,
                                                        tuned, command, in_place=True), model_files, step.settings)
    return read


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
    if not session.world.main:  # under several processes the main one writes
        return
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

    c, name = pl.cfg, train_dir_name(i, train)
    tdir = pl.cfg.out / name
    tuned = tdir / "tuned"
    tuned_weights: list[Path] = []
    read: dict[str, str] | None = None  # the adapter's recorded hashes, where it is gone but not needed
    steps = pl.set_steps(i, train)

    def outputs(step: Step) -> list[Path]:
        if step.kind in ("icl", "sft"):
            scored = c.icl_scores if step.kind == "icl" else shift_scores()
            return [tdir / f"scores-{step.kind}.json"] + ([tdir / f"predict-{step.kind}"] if c.score in scored else [])
        if step.kind in ("evaluate", "reference"):  # the tuned model's evaluations
            return [tdir / ("eval-tuned-reference" if step.kind == "reference" else "eval-tuned")]
        raise ValueError(f"a stage of unknown kind {step.kind!r}")

    for n, step in enumerate(steps):
        if step.kind == "icl":
            stages.run(step.name, outputs(step), lambda: run_prediction(pl, train, Method.ICL, tdir, stages.progress),
                       model_files, step.settings)
        elif step.kind == "finetune":
            read = run_finetune(pl, stages, step, train, tuned, model_files,
                                [(s.name, outputs(s), s.settings) for s in steps[n + 1:]], c.command)
            tuned_weights = list(tuned.glob("*.safetensors"))  # what the later stages read
        elif step.kind == "sft":
            stages.run(step.name, outputs(step), lambda: run_prediction(pl, train, Method.SFT, tdir, stages.progress),
                       tuned_weights, step.settings, read)
        else:
            run_evaluation(pl, stages, step, str(tuned), outputs(step)[0], tuned_weights, read)
    return {"spec": train.spec, "dir": tdir,
            "eval": Evaluation.load(tdir / "eval-tuned") if c.question_evaluation else None,
            "scores": {m: json.loads((tdir / f"scores-{m}.json").read_text())["scores"] for m in c.shifts}}


def validate(cfg: ValidateConfig, progress: Callable[[str], None] = lambda _m: None) -> ValidationResult:
    """Per training set: predict (icl) -> finetune -> evaluate -> predict (sft); then the
    transfer matrix and its correlations. Stages already done are verified and reused."""
    from sts.engine.distributed import join_run
    from sts.engine.evaluation import Evaluation

    started = time.perf_counter()
    # launched as several processes (torchrun): every process runs every stage and shares its work
    # (the predictions' passes, the evaluations' questions, the trainer's data parallelism); the
    # main process writes the results folder
    w, progress = join_run(cfg.placement.resolved()[0], progress)
    pl = plan(cfg)
    cfg = pl.cfg
    protocols = [p for p in Protocol if p is not Protocol.PAPER or len(pl.inputs.domains) >= PAPER_DOMAINS]
    if cfg.protocol not in protocols:
        raise UserError(f"the {cfg.protocol} protocol needs {PAPER_DOMAINS} domains (there are "
                        f"{len(pl.inputs.domains)}); use --protocol signed or abs")
    if w.main:
        cfg.out.mkdir(parents=True, exist_ok=True)
    barrier(w)
    timings: dict[str, float] = {}
    stages = Stages(cfg.out, timings, progress)
    model_files = sorted(Path(cfg.model).glob("*.safetensors")) if Path(cfg.model).is_dir() else []
    for step in pl.base_steps():
        where = cfg.out / ("eval-base-reference" if step.kind == "reference" else "eval-base")
        run_evaluation(pl, stages, step, cfg.model, where, model_files)
    per_train = {train_dir_name(i, t): run_training_set(pl, stages, i, t, model_files)
                 for i, t in enumerate(pl.inputs.trains)}
    progress("[validate] correlations")  # cheap: always recomputed from the stages' outputs
    base_ref = Evaluation.load(cfg.out / "eval-base-reference") if pl.inputs.reference else None
    base = Evaluation.load(cfg.out / "eval-base") if cfg.question_evaluation else None
    changes, metrics = measured_changes(cfg, base, base_ref, per_train)
    rows = per_set_correlations(cfg, per_train, changes, metrics, protocols)
    matrix_rows = matrix_correlations(cfg, per_train, changes, metrics)
    swap, own = swap_rows(cfg, per_train, changes, metrics), own_domain_rows(cfg, pl, per_train, changes)
    first = next(iter(per_train))
    comparison = [r for r in rows if r["train"] == first and r["metric"] == cfg.metric]
    if w.main:
        library.from_validation(cfg.out, per_train, changes, cfg.sae, cfg.model, cfg.k, cfg.metric, pl.sides()).save(
            cfg.out / "library.json")  # for `sts predict --library`: shared and own parts
        write_matrices(cfg.out, per_train, changes, metrics)
        write_correlations(cfg.out, rows, matrix_rows)
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
    if w.main:
        write_results(cfg.out, results)
    return results
