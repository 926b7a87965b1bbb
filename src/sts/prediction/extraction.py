"""What a prediction extracts, through the cache: the training set's shift, the domains'
statistics, texts, gradient sides and the lookahead's losses, the union of what the asked scores
read (`sts.scores.score.Kind.reads`), and the training responses it reads them on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sts.choices import Readout
from sts.data.datasets import DomainDemos
from sts.data.examples import Dataset, Example, unsealed
from sts.data.inputs import domain_render, sequences, training_render
from sts.engine import extract as ex
from sts.engine.gradients import GradientStats
from sts.engine.stats import FeatureStats, PairedStats, RunStats
from sts.errors import UserError, no_tokens
from sts.prediction.config import PredictConfig
from sts.prediction.session import (
    Session,
    _cached_stats,
    _examples_hash,
    domain_key,
    exact_train_key,
    generated_key,
    gradient_domain_key,
    gradient_train_key,
    lookahead_key,
    shift_key,
    training_sketch,
)
from sts.scores.baselines import domain_text, training_text
from sts.scores.score import Extraction, check_score, spec_of, uses_domain_demos
from sts.scores.selection import check_k


def explains(cfg: PredictConfig, scores: tuple[str, ...]) -> bool:
    """Whether the training set's SAE shift is read only to explain a score over no shifted
    features (`PredictConfig.explain`)."""
    return cfg.explain and any(not spec_of(s).uses_shift for s in scores)


def _first(train: Dataset, n: int) -> Dataset:
    """The set cut to its first n examples (0: all of them)."""
    return dataclasses.replace(train, examples=train.examples[:n]) if 0 < n < len(train.examples) else train


def explained(cfg: PredictConfig, train: Dataset) -> Dataset:
    """The training examples whose shift only explains the ranking: the first `explain_examples`
    (the features it lists are the whole set's, measured: docs/results/explain/EXPLAIN.md)."""
    return _first(train, cfg.explain_examples)


def gradient_train(cfg: PredictConfig, train: Dataset) -> Dataset:
    """The training examples whose gradients the gradient scores read: the first `gradient_examples`
    (the ranking of the first 25 agrees with all 100's: docs/results/subset/SUBSET.md's rule). The
    lookahead's steps draw from the whole set, as the run does."""
    return _first(train, cfg.gradient_examples)


def with_explanation(cfg: PredictConfig, scores: tuple[str, ...], readouts: tuple[str, ...]) -> tuple[str, ...]:
    """The training shift's readouts (`needs`), plus the SAE's where it explains the scores
    (the training side only: the explanation reads no domain)."""
    return readouts + (Readout.SAE,) if explains(cfg, scores) and Readout.SAE not in readouts else readouts


def needs(scores: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], bool, bool]:
    """(readouts of the training shift, readouts of the domains' single pass, whether the
    domains' ICL pairs are needed, whether texts are)."""
    def readouts(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(r for r in ex.READOUTS if any(spec_of(s).reads("statistics") and spec_of(s).readout == r
                                                   for s in names))

    pairs = tuple(s for s in scores if uses_domain_demos(s))
    return (readouts(scores), readouts(tuple(s for s in scores if s not in pairs)), bool(pairs),
            any(spec_of(s).reads("texts") for s in scores))


def check_extraction(cfg: PredictConfig, domains: dict[str, list[Example]], scores: tuple[str, ...],
                     demos: DomainDemos | None, session: Session) -> None:
    """Every rule of an extraction that can fail before anything runs (bad input, exit 2)."""
    for name in scores:
        check_score(name)
    readouts, _domain_readouts, domain_pairs, _texts = needs(scores)
    if cfg.method == "paper" and readouts not in ((), ("sae",)):
        raise UserError("--method paper shifts SAE features only; the raw-* and cosine scores need "
                        "--method icl or sft")
    if domain_pairs and demos is None:
        raise UserError("the icl score needs domain demonstrations")
    empty = [name for name, exs in domains.items() if not exs]
    if empty:
        raise UserError(f"domain(s) {', '.join(empty)} have no questions; check --domains")
    if any(spec_of(s).uses_shift for s in scores):  # an explanation shows min(k, width) features
        check_k(cfg.k, session.sae.d_sae)  # raw scores take min(k, hidden size) dimensions


def extract_all(cfg: PredictConfig, train: Dataset, domains: dict[str, list[Example]],
                scores: tuple[str, ...], demos: DomainDemos | None = None,
                progress: Callable[[str], None] = lambda _m: None, session: Session | None = None,
                gradient_domains: dict[str, list[Example]] | None = None) -> Extraction:
    """Extract (or read from the cache) what `scores` need, each in one pass per input.
    `gradient_domains`: the records whose loss the gradient scores' domain side takes (default
    `domains`; `sts validate` passes the cot_nll reference records when that is its ground truth)."""
    s = session or Session(cfg, progress)
    check_extraction(cfg, domains, scores, demos, s)
    needed, domain_readouts, domain_pairs, texts = needs(scores)
    readouts = with_explanation(cfg, scores, needed)
    shift: dict[str, PairedStats] = {}
    if readouts and not needed:  # only the explanation reads the shift
        try:
            shift = _training_shift(cfg, explained(cfg, train), s, readouts, progress)
        except UserError as e:  # the scores stand without their explanation: said, not fatal
            progress(f"warning: no SAE explanation of the ranking ({e})")
    elif readouts:
        shift = _training_shift(cfg, train, s, readouts, progress)
    per_domain = _domain_stats(cfg, domains, s, domain_readouts)
    icl = _domain_icl(cfg, domains, demos, s) if domain_pairs and demos is not None else {}
    text = None
    if texts:
        unsealed((e for exs in domains.values() for e in exs), "the lexical score")
        text = (training_text(train.examples), {d: domain_text(exs) for d, exs in domains.items()})
    gradients = None
    records = gradient_records(cfg, domains) if gradient_domains is None else gradient_domains
    if any(spec_of(name).reads("gradients") for name in scores):
        gradients = _gradients(cfg, train, records, s, progress)
    ahead = [name for name in scores if spec_of(name).reads("lookahead")]
    looked = _lookahead_scores(cfg, train, records, tuple(ahead), s, progress) if ahead else {}
    return Extraction(s.point.name, shift, per_domain, icl, text, {d: len(e) for d, e in domains.items()}, demos,
                      gradients, looked)


def gradient_records(cfg: PredictConfig, domains: dict[str, list[Example]]) -> dict[str, list[Example]]:
    """The records the gradient and lookahead scores' domain side reads: at most cfg.probe_records a
    domain (`references.probe_draw`); the plan line counts the same."""
    from sts.data.references import probe_draw

    return probe_draw(domains, cfg.probe_records, cfg.seed)


def _training_shift(cfg: PredictConfig, train: Dataset, s: Session, readouts: tuple[str, ...],
                    progress: Callable[[str], None]) -> dict[str, PairedStats]:
    """The training set's paired statistics (its shift) on each of `readouts`, through the cache."""
    render = training_render(cfg.method)

    def compute_shift(missing: tuple[str, ...]) -> dict[str, PairedStats]:
        e = s.engine()
        progress(f"shift ({cfg.method}) on {len(train.examples)} training examples")
        tuned = s.extractor(cfg.tuned_model or "") if cfg.method == "sft" else None
        own = own_responses(cfg, train, s, progress).examples if cfg.method == "data" else None
        return ex.shift_stats(e, cfg.method, train.examples, render, cfg.demos, cfg.seed, cfg.max_length,
                              cfg.max_tokens if cfg.method == "paper" else None, tuned, missing, own)

    key = shift_key(s, cfg, train)
    got = _cached_stats(s.cache, {r: key | {"readout": r} for r in readouts}, compute_shift, PairedStats)
    for stats in got.values():
        if stats.a.count == 0:
            raise UserError(f"no aligned tokens in the training set {train.spec}; check its data")
    return got


def _domain_stats(cfg: PredictConfig, domains: dict[str, list[Example]], s: Session, readouts: tuple[str, ...]
                  ) -> dict[str, dict[str, FeatureStats]]:
    """readout -> domain -> each domain's single-run statistics, through the cache."""
    domains_read = domain_render(cfg.first_token)
    per_domain: dict[str, dict[str, FeatureStats]] = {r: {} for r in readouts}
    if not readouts:
        return per_domain
    for name, exs in domains.items():
        def compute_domain(missing: tuple[str, ...], exs: list[Example] = exs, name: str = name
                           ) -> dict[str, RunStats]:
            unsealed(exs, f"reading domain {name} ({', '.join(missing)})")
            e = s.engine()
            seqs = sequences(exs, e.lm.tokenizer, domains_read, cfg.max_length)
            got = e.stats_many(seqs, missing, len(exs), cfg.max_tokens, desc=f"domain {name}")
            return {r: RunStats(st, meta={"readout": r}) for r, st in got.items()}

        key = domain_key(s, cfg, exs)
        got = _cached_stats(s.cache, {r: key | {"readout": r} for r in readouts}, compute_domain, RunStats)
        for r, single in got.items():
            if single.a.count == 0:
                raise no_tokens(f"domain {name}", "it is empty; check its data")
            per_domain[r][name] = single.a
    return per_domain


def _domain_icl(cfg: PredictConfig, domains: dict[str, list[Example]], demos: DomainDemos, s: Session
                ) -> dict[str, PairedStats]:
    """Each domain's paired statistics with and without its demonstrations (the icl scores)."""
    domains_read = domain_render(cfg.first_token)
    icl: dict[str, PairedStats] = {}
    for name, exs in domains.items():
        icl_key = s.base_key | {"kind": "domain-icl", "render": asdict(domains_read),
                                "examples": _examples_hash(exs), "demos": _examples_hash(list(demos.demos[name])),
                                "max_tokens": cfg.max_tokens}

        def compute_icl(exs: list[Example] = exs, name: str = name) -> PairedStats:
            unsealed(exs, f"the icl score of domain {name}")
            return ex.domain_shift_stats(s.engine(), exs, {name: demos.demos[name]}, domains_read,
                                         cfg.max_length, cfg.max_tokens, desc=f"domain {name} (icl)")

        icl[name] = _cached_stats(s.cache, {"": icl_key}, lambda _missing: {"": compute_icl()}, PairedStats)[""]
    return icl


def _gradients(cfg: PredictConfig, train: Dataset, domains: dict[str, list[Example]], s: Session,
               progress: Callable[[str], None]) -> GradientStats:
    """The gradient scores' statistics, cached apart: the training side by model, examples and
    LoRA spec; each domain's side by model, its records and the adapter's initialisation, so
    that another training set (a comparison's next candidate) reuses the domains' backward
    passes, and an interrupted run keeps the domains it finished."""
    from sts.engine.gradients import TrainingGradients

    whole, train = len(train.examples), gradient_train(cfg, train)
    if len(train.examples) < whole:
        progress(f"gradients: the first {len(train.examples)} of {whole} training examples (--gradient-examples; "
                 "0 reads all)")
    tdim = training_sketch(s, cfg)
    if tdim:  # each example's sketched row kept beside S G: `grad`'s terms (an attribution), any domain later
        t = s.cache.get_or_compute_many(
            {"": gradient_train_key(s, cfg, train, tdim)},
            lambda _m: {"": _exact_training_side(cfg, train, s, progress, rows=tdim).sketched(tdim)},
            TrainingGradients.load, lambda g, path: g.save(path))[""]
        return GradientStats.join(t, _domain_sides(cfg, domains, s, progress))
    sides = _domain_sides(cfg, domains, s, progress)
    if s.exact_training:  # a mixture's parts: their exact sides mix (`GradientStats.mixed`), no terms
        return GradientStats.join(_exact_training_side(cfg, train, s, progress), sides)
    # exact (--gradient-sketch 0): the terms are read against these domains' exact sides in the pass
    return GradientStats.join(_exact_training_side(cfg, train, s, progress, against=(sides, domains)), sides)


def gradient_domain_sides(cfg: PredictConfig, domains: dict[str, list[Example]], s: Session,
                          progress: Callable[[str], None]) -> Any:
    """Each domain's gradient side on the records `grad` reads of it (`gradient_records`), sketched
    to cfg.gradient_sketch: shipped, cached or computed, as a prediction reads them (`sts select`'s
    targets)."""
    return _domain_sides(cfg, gradient_records(cfg, domains), s, progress)


def adapted_model(s: Session, cfg: PredictConfig) -> Any:
    """The model with the fine-tuning run's LoRA adapter at its first step (`gradients.adapted`)."""
    return _adapted(s, cfg)


def _adapted(s: Session, cfg: PredictConfig) -> Any:
    """The adapted copy of the model (`gradients.adapted`), built once a session and only if needed."""
    if s.adapted is None:
        from sts.engine.gradients import adapted

        s.adapted = adapted(s.engine().lm, cfg.finetune)
    return s.adapted


def _exact_training_side(cfg: PredictConfig, train: Dataset, s: Session, progress: Callable[[str], None],
                         rows: int = 0, against: tuple[Any, dict[str, list[Example]]] | None = None) -> Any:
    """G and v (cached, `exact_train_key`); with each example's row sketched to `rows`, or its
    products with exact domain sides (`against`: the DomainGradients and the records they were read on)."""
    import torch

    from sts.engine.gradients import PerExample, TrainingGradients, training_side

    key = exact_train_key(s, cfg, train, rows, against[1] if against is not None else None)
    names, keep = None, None
    if rows:
        keep = PerExample(dim=rows)
    elif against is not None:
        sides = against[0]
        names = list(sides.domains)
        keep = PerExample(against=torch.stack([sides.domains[d] for d in names]))
    return s.cache.get_or_compute_many(
        {"": key},
        lambda _m: {"": training_side(s.engine().lm, _adapted(s, cfg), train.examples, cfg.finetune, progress,
                                      keep, names)},
        TrainingGradients.load, lambda g, path: g.save(path))[""]


def _domain_sides(cfg: PredictConfig, domains: dict[str, list[Example]], s: Session,
                  progress: Callable[[str], None]) -> Any:
    """Each domain's gradient side, sketched to cfg.gradient_sketch (read where shipped or cached)."""
    from sts.engine.gradients import DomainGradients, domain_side

    dim = cfg.gradient_sketch

    def exact(d: str, exs: list[Example]) -> DomainGradients:  # one cache entry a domain, written as it finishes
        return s.cache.get_or_compute_many(
            {d: gradient_domain_key(s, cfg, d, exs)},
            lambda _m: {d: domain_side(s.engine().lm, _adapted(s, cfg), {d: exs}, progress=progress,
                                       content=cfg.gradient_content)},
            DomainGradients.load, lambda g, path: g.save(path))[d]

    def one(d: str, exs: list[Example]) -> DomainGradients:  # sketched: read it (shipped too), else sketch the exact
        if not dim:
            return exact(d, exs)
        return s.cache.get_or_compute_many(
            {d: gradient_domain_key(s, cfg, d, exs, dim)}, lambda _m: {d: exact(d, exs).sketched(dim)},
            DomainGradients.load, lambda g, path: g.save(path))[d]

    sides = {d: one(d, exs) for d, exs in domains.items()}
    return DomainGradients({d: g.domains[d] for d, g in sides.items()}, {d: g.records[d] for d, g in sides.items()},
                           dim)


def check_lookahead(cfg: PredictConfig, domains: dict[str, list[Example]]) -> None:
    """Bad input for a lookahead score, said before a model loads: a step count that moves
    nothing, or line / look on sealed domains (their loss needs the records' text)."""
    from sts.data.examples import SealedExample
    from sts.engine.lookahead import check_steps

    check_steps(cfg.steps, cfg.finetune)
    spec = spec_of(cfg.score)
    if spec.reads_texts and any(isinstance(e, SealedExample) for q in domains.values() for e in q):
        raise UserError(f"--score {cfg.score} reads each domain's loss on its records, and the embedded reference "
                        "domains ship no text: use --score look-fo (the same run's steps against the shipped "
                        "gradient sides), or give --domains a file of records with reference chains of thought")


def _lookahead_scores(cfg: PredictConfig, train: Dataset, domains: dict[str, list[Example]], names: tuple[str, ...],
                      s: Session, progress: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """line, look and look-fo (`sts.engine.lookahead`): the run's first cfg.steps optimizer steps (cached
    by model, examples, recipe and steps), then each domain's loss there (forward passes) or the
    displacement against the domain's gradient side."""
    from sts.engine.gradients import domain_losses, sketch
    from sts.engine.lookahead import Lookahead, drops, flat_state, line_point, lookahead, moved_losses

    k = cfg.steps
    directions = {spec_of(n).direction for n in names}
    look = None
    if directions & {"look", "look-fo"}:
        look = s.cache.get_or_compute_many(
            {"": lookahead_key(s, cfg, train)},
            lambda _m: {"": lookahead(s.engine().lm, train.examples, cfg.finetune, (k,), progress)},
            Lookahead.load, lambda g, path: g.save(path))[""]
    base: dict[str, float] = {}
    if directions & {"line", "look"}:
        from sts.engine.gradients import domain_side_key
        from sts.files import atomic_path

        def load(path: Path) -> float:
            return float(json.loads(path.read_text())["loss"])

        def save(value: float, path: Path) -> None:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps({"loss": value}))

        keys = {d: s.base_key | {"kind": "domain-loss", "domain": d, "records": _examples_hash(exs),
                                 "adapter": domain_side_key(cfg.finetune)} for d, exs in domains.items()}
        base = s.cache.get_or_compute_many(  # each domain's loss at theta0: the same for every training set
            keys, lambda missing: domain_losses(s.engine().lm, _adapted(s, cfg), {d: domains[d] for d in missing}),
            load, save, ".json")
    out: dict[str, dict[str, float]] = {}
    for name in names:
        direction = spec_of(name).direction
        if direction == "look-fo":
            assert look is not None
            sides = _domain_sides(cfg, domains, s, progress)
            move = -look.displacement(k).double()  # theta0 - theta_k
            u = sketch(move, sides.sketch) if sides.sketch else move
            out[name] = {d: float(u @ g.double()) for d, g in sides.domains.items()}
            continue
        if direction == "look":
            assert look is not None
            state = look.states[k]
        else:
            g = _exact_training_side(cfg, gradient_train(cfg, train), s, progress).mean
            state = line_point(cfg.finetune, g, flat_state(_adapted(s, cfg)), k)
        progress(f"{name}: each domain's loss {k} steps out")
        out[name] = drops(base, moved_losses(s.engine().lm, cfg.finetune, domains, {name: state})[name])
    return out


def reused(session: Session, progress: Callable[[str], None]) -> None:
    """Say what came from the cache (and what shipped with the package)."""
    hits = session.cache.hits
    if hits:
        shipped = hits.count("shipped")
        progress(f"reused {len(hits)} cached entr{'y' if len(hits) == 1 else 'ies'}"
                 + (f" ({shipped} shipped with sts)" if shipped else ""))


def responses(cfg: PredictConfig, train: Dataset, session: Session,
              progress: Callable[[str], None] = lambda _m: None) -> Dataset:
    """The training set whose responses the shift reads: as given, or (`generated`) the base
    model's own answers to its prompts."""
    return train if cfg.responses == "dataset" else own_responses(cfg, train, session, progress)


def own_responses(cfg: PredictConfig, train: Dataset, session: Session,
                  progress: Callable[[str], None] = lambda _m: None) -> Dataset:
    """The training prompts with the base model's own answers, sampled as `cfg.generation` says
    and cached by model, prompts and sampling settings."""
    from sts.engine.generate import generated_responses

    key = generated_key(session, cfg, train)

    def compute() -> dict[int, str]:
        progress(f"generating responses to {len(train.examples)} training prompts "
                 f"(temperature {cfg.generation.temperature}, at most {cfg.generation.max_new_tokens} tokens)")
        engine = session.engine()
        new = generated_responses(engine.lm, train.examples, cfg.generation, cfg.batch_size or 8)
        return {i: e.response or "" for i, e in enumerate(new)}

    texts = session.cache.get_or_compute_json(key, compute)
    examples = [dataclasses.replace(e, response=texts[i]) for i, e in enumerate(train.examples)]
    return dataclasses.replace(train, examples=examples)
