"""`sts predict`: training set -> shifted features -> STS per domain -> ranking and report.

Extraction results are cached (`sts.cache`), keyed by everything that determines them
(model files, SAE weights, the examples themselves, demonstrations, token selection, layer,
limits, code version).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from sts import __version__, defaults
from sts import extract as ex
from sts.cache import Cache, cache_root, fingerprint
from sts.choices import DEFAULT_K, DEFAULT_SCORE, Method, Readout, Responses, parse
from sts.data import Dataset, DomainDemos, Example, domain_demonstrations, unsealed
from sts.errors import UserError, check_positive, no_tokens, refuse_unused
from sts.finetuning import FinetuneSpec
from sts.generate import Generation
from sts.gradients import GradientStats
from sts.inputs import ModelInput, Render, domain_render, sequences, training_render
from sts.library import Decomposition, Library, check_library, decompose, side_label, side_mismatch
from sts.models import Placement
from sts.score import (
    Extraction,
    Shift,
    ShiftSamples,
    check_k,
    check_score,
    domain_text,
    spec_of,
    top_features,
    training_text,
    uses_domain_demos,
)
from sts.stats import FeatureStats, PairedStats, RunStats, load_stats

# Bump when extraction semantics change (3: per-example shifts; 4: ICL pairs keep their
# demonstrations whole and cut the example; readouts; domain ICL pairs).
CACHE_FORMAT = 4

S = TypeVar("S", RunStats, PairedStats)


@dataclass
class PredictConfig:
    """Everything a prediction depends on. `model` and `sae` name what to load ("" = the
    embedded SmolLM2-135M and its SAE); in the Python API they may instead be passed to
    `predict` as loaded objects, and then only label the results."""

    model: str = ""
    sae: str = ""
    # a dataset spec; or several to compare (`sts.compare`), or weighted parts of one mixture
    # (["A:0.7", "B:0.3"], `sts.mixture`): `predict` then returns a Comparison
    train: str | list[str] = defaults.TRAIN
    domains: str = defaults.PREDICT_DOMAINS
    method: Method = defaults.METHOD
    tuned_model: str | None = None
    k: int = DEFAULT_K
    demos: int = defaults.DEMOS
    seed: int = defaults.SEED
    max_train: int | None = defaults.PREDICT_MAX_TRAIN
    max_examples: int | None = defaults.PREDICT_MAX_EXAMPLES  # per domain
    max_tokens: int | None = None  # per domain
    max_length: int | None = defaults.MAX_LENGTH
    batch_size: int | None = None  # at most this many sequences per forward pass (None: no cap)
    batch_tokens: int = defaults.BATCH_TOKENS  # padded tokens per forward pass; sequences are sorted by length
    top_contexts: int = defaults.TOP_CONTEXTS
    use_cache: bool = True
    first_token: bool = defaults.PREDICT_FIRST_TOKEN  # count each domain question's first token (the attention sink)
    # a registered score (`sts.score.REGISTRY`); "": chosen by the domains' records (`score_for`)
    score: str = ""
    domain_demos: str | None = None  # dataset of per-domain demonstrations (icl score)
    domain_demos_n: int = defaults.DOMAIN_DEMOS_N  # m, as the paper
    placement: Placement = field(default_factory=Placement)  # --device, --dtype, --device-map
    # "dataset": read features on each training record's own response; "generated": on the base
    # model's answer to its prompt (the reference extraction), sampled as `generation` says
    responses: Responses = defaults.RESPONSES
    generation: Generation = field(default_factory=Generation)
    skip_bad_lines: bool = False  # skip malformed JSONL lines of the training and domain files
    # the fine-tuning run the gradient scores (grad, grad-adam) take the first step of
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    # measured runs on this model and SAE that split the prediction into shared and own parts
    # (`sts.library`): a library.json or `sts validate` folder; None: the embedded one with the
    # embedded SAE, else none; "": none
    library: str | None = None
    # libraries (library.json or `sts validate` folders) that calibrate scores into changes in
    # the metric's units with intervals (`sts.calibration`); None: the --library one; []: none
    calibrate: list[str] | None = None
    target: list[str] | None = None  # domains to choose between the sets for (several --train)
    # also score the mixtures of the 2-3 sets on a grid of this step (1/N); None: the grid of
    # `defaults.TARGET_MIX_GRID` when --target chooses among 2-3 unweighted sets, else 0
    mix_grid: int | None = None
    # a score over no shifted features (cosine, lexical, grad, grad-adam) still reads the training
    # set's SAE shift and reports its top k features as the explanation of the ranking (the held-out
    # round's pre-registration: a default that needs no SAE keeps the SAE's account of the data);
    # False: skip that pass (for these scores, the only use of the SAE)
    explain: bool = True
    # the gradient scores compare both sides through a count sketch of this dimension (`sts.gradients`;
    # 0: exact); the sketched domain sides of the embedded default ship with the package
    gradient_sketch: int = defaults.GRADIENT_SKETCH
    # the gradient scores' domain side leaves the references' templated openings out of its loss
    # (cot_nll_content's tokens; `sts validate --metric cot_nll_content` sets it); a record with no
    # reference chain of thought keeps its correct option's loss
    gradient_content: bool = False
    # line, look, look-fo: the optimizer steps of the fine-tuning run the score looks ahead (`sts.lookahead`)
    steps: int = defaults.LOOKAHEAD_STEPS

    def __post_init__(self) -> None:
        """Every rule between fields, checked once: a bad config fails before anything loads."""
        if isinstance(self.train, (list, tuple)):
            from sts.mixture import candidates, default_grid, parse_part

            self.train = list(self.train)
            if self.mix_grid is None:
                self.mix_grid = default_grid(self.train, self.target)
            candidates(self.train, self.mix_grid)  # a bad list fails here, in one line
            if len(self.train) == 1 and parse_part(self.train[0]).weight is None:
                self.train = self.train[0]
        several = isinstance(self.train, list)
        self.mix_grid = self.mix_grid or 0
        refuse_unused([("--mix-grid", self.mix_grid != 0 and not several, "it mixes several --train sets"),
                       ("--target", bool(self.target) and not several,
                        "it ranks several --train sets for those domains; give two or more")])
        self.method = parse(Method, self.method, "--method")
        self.score = check_score(self.score) if self.score else ""
        self.responses = parse(Responses, self.responses, "--responses")
        if self.method is Method.SFT and not self.tuned_model:
            raise UserError("--method sft needs --tuned-model (the fine-tuned model)")
        check_positive({"--k": self.k, "--demos": self.demos, "--max-train": self.max_train,
                        "--max-examples": self.max_examples, "--max-tokens": self.max_tokens,
                        "--max-length": self.max_length, "--batch-size": self.batch_size,
                        "--batch-tokens": self.batch_tokens, "--domain-demos-n": self.domain_demos_n,
                        "--steps": self.steps})
        if self.gradient_sketch < 0:
            raise UserError(f"--gradient-sketch must be 0 (exact) or a positive dimension (got {self.gradient_sketch})")
        self._refuse_what_changes_nothing()
        self.placement.resolved()  # a bad device or dtype fails here, in one line

    def _refuse_what_changes_nothing(self) -> None:
        """An option that this combination ignores is bad input: the user meant something else.
        (Rules that depend on the score are `refuse_unused_for_score`'s: `sts validate` reads
        every score from one config.)"""
        generated = self.responses is Responses.GENERATED or self.method is Method.DATA
        if self.responses is Responses.GENERATED and self.method is Method.DATA:
            raise UserError("--method data compares the dataset's responses with the model's own: drop "
                            "--responses generated")
        refuse_unused([("--tuned-model", self.tuned_model is not None and self.method is not Method.SFT,
                  "it is the shifted side of --method sft"),
                 ("--temperature", self.generation.temperature != defaults.TEMPERATURE and not generated,
                  "it samples --responses generated and --method data"),
                 ("--max-new-tokens", self.generation.max_new_tokens != defaults.MAX_NEW_TOKENS and not generated,
                  "it bounds --responses generated and --method data")])

    def refuse_unused_for_score(self) -> None:
        """The options that one score (`sts predict`'s) and this method leave unused."""
        spec = spec_of(self.score)
        refuse_unused([("--demos", self.demos != defaults.DEMOS and self.method in (Method.SFT, Method.DATA),
                  f"the {self.method} shift reads no demonstrations"),
                 ("--k", self.k != DEFAULT_K and not spec.uses_shift and not self.explain,
                  f"--score {self.score} does not use the shifted features, and --no-explain leaves them out"),
                 ("--no-explain", not self.explain and spec.uses_shift,
                  f"--score {self.score} reads the shifted features itself: they are its explanation"),
                 ("--domain-demos", self.domain_demos is not None and not spec.domain_demos,
                  f"--score {self.score} reads no domain demonstrations (the icl scores do)"),
                 ("--domain-demos-n", self.domain_demos_n != defaults.DOMAIN_DEMOS_N and not spec.domain_demos,
                  f"--score {self.score} reads no domain demonstrations (the icl scores do)"),
                 ("--gradient-sketch", self.gradient_sketch != defaults.GRADIENT_SKETCH and not spec.reads("gradients")
                  and spec.direction != "look-fo", f"--score {self.score} reads no gradient sides (grad, grad-adam, "
                  "grad-sign and look-fo do)"),
                 ("--steps", self.steps != defaults.LOOKAHEAD_STEPS and not spec.reads("lookahead"),
                  f"--score {self.score} takes no step of the run (line, look and look-fo do)")])


@dataclass
class FeatureReport:
    index: int
    shift: float
    contexts: list[dict[str, Any]] = field(default_factory=list)  # top activations in the data


@dataclass
class Prediction:
    config: PredictConfig  # as run (its `score` is the one this prediction holds)
    hook: str
    scores: dict[str, float]  # domain -> STS
    tokens: dict[str, int]  # domain -> tokens scored
    questions: dict[str, int]
    train_tokens: int
    features: list[FeatureReport]
    samples: ShiftSamples | None = None  # for bootstrapping S (icl/sft shifts)
    score: str = DEFAULT_SCORE
    demonstrations: dict[str, Any] | None = None  # the domain demonstrations (icl score)
    truncation: dict[str, Any] = field(default_factory=dict)  # ICL pairs cut to fit max_length
    generated: list[dict[str, str]] | None = None  # --responses generated: each prompt and its answer
    decomposition: Decomposition | None = None  # shared and own parts (a library of measured runs)
    decomposition_note: str = ""  # why there is none, when a library was asked for or is the default
    calibrations: dict[str, Any] = field(default_factory=dict)  # metric -> sts.calibration.Calibration
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> domain -> calibrated Change
    calibration_note: str = ""
    calibration_checks: dict[str, Any] = field(default_factory=dict)  # metric -> its leave-one-set-out Evaluation
    side: str = ""  # what the domain side read (`library.side_label`): the form whose record the report quotes

    @property
    def formula(self) -> str:
        return spec_of(self.score).formula

    def ranking(self) -> list[tuple[int, str, float, int]]:
        ordered = sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(i + 1, name, value, self.tokens[name]) for i, (name, value) in enumerate(ordered)]


def _examples_hash(examples: list[Example]) -> str:
    return hashlib.sha256(json.dumps([asdict(e) for e in examples], sort_keys=True).encode()).hexdigest()


def _cached_stats(cache: Cache, keys: dict[str, dict[str, Any]],
                  compute: Callable[[tuple[str, ...]], dict[str, S]], kind: type[S]) -> dict[str, S]:
    """Statistics entries of the cache; an entry of the other kind is not trusted."""
    def load(path: Path) -> S:
        stats = load_stats(path)
        if not isinstance(stats, kind):
            raise ValueError(f"{path.name} holds {type(stats).__name__}, not {kind.__name__}")
        return stats

    return cache.get_or_compute_many(keys, compute, load, lambda stats, path: stats.save(path))


# --- top-activating contexts ---------------------------------------------------------------

def top_contexts(engine: ex.Extractor, seqs: list[ModelInput], features: list[int], n: int,
                 tok: Any, window: int = 12) -> dict[int, list[dict[str, Any]]]:
    """For each feature, the n tokens (over the counted positions of `seqs`) where it fires
    most, with a few tokens of context on each side and the token itself in [[...]]."""
    heaps: dict[int, list[tuple[float, int, int]]] = {j: [] for j in features}
    cols = torch.tensor(features, dtype=torch.long)
    for indices, batch in engine.batches(seqs, len(seqs), "contexts"):
        f = engine.features(batch)[:, cols.to(engine.device)].cpu()
        where = [(i, p) for i, s in zip(indices, batch) for p in s.positions]
        values, rows = f.topk(min(n, f.shape[0]), dim=0)
        for c, j in enumerate(features):
            for v, r in zip(values[:, c].tolist(), rows[:, c].tolist()):
                if v > 0:
                    item = (v, *where[r])
                    (heapq.heappush if len(heaps[j]) < n else heapq.heappushpop)(heaps[j], item)
    out: dict[int, list[dict[str, Any]]] = {}
    for j, heap in heaps.items():
        out[j] = []
        for v, si, pos in sorted(heap, reverse=True):
            ids = seqs[si].ids
            left = tok.decode(ids[max(0, pos - window):pos])
            mid = tok.decode(ids[pos:pos + 1])
            right = tok.decode(ids[pos + 1:pos + 4])
            out[j].append({"activation": round(v, 4), "token": mid,
                           "context": f"{left}[[{mid}]]{right}".replace("\n", "\\n")})
    return out


# --- the prediction --------------------------------------------------------------------------

def explains(cfg: PredictConfig, scores: tuple[str, ...]) -> bool:
    """Whether the training set's SAE shift is read only to explain a score over no shifted
    features (`PredictConfig.explain`)."""
    return cfg.explain and any(not spec_of(s).uses_shift for s in scores)


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


def identity(spec: str) -> str:
    """A model or SAE spec's identity for cache keys: the embedded model and SAE by what they
    are, not where they sit (the GGUF's sha256 for the model rebuilt from it, whose weights'
    mtime differs on every machine; the SAE's files), so that the embedded default's
    statistics have one key everywhere and can ship with the package (`sts.cache.SHIPPED`);
    anything else by `sts.cache.fingerprint`."""
    from sts.cache import DEFAULT_MODEL_DIRNAME, hash_path
    from sts.embedded import GGUF, SAE_DIR

    if spec:
        path = Path(spec).resolve()
        if path == (cache_root() / DEFAULT_MODEL_DIRNAME).resolve():
            return f"embedded-model:{GGUF[2]}"
        if path == SAE_DIR.resolve():
            h = hashlib.sha256(b"embedded-sae")
            hash_path(SAE_DIR, h)
            return f"embedded-sae:{h.hexdigest()}"
    return fingerprint(spec)


class Session:
    """Loads the SAE up front (cheap, and it validates the pairing) and the model only when an
    extraction is not cached."""

    def __init__(self, cfg: PredictConfig, progress: Callable[[str], None],
                 lm: Any = None, sae: Any = None):
        """`lm` (a LoadedModel) and `sae` (a LoadedSAE): objects the caller already holds,
        used as they are (their device and dtype) instead of loading `cfg.model`/`cfg.sae`.
        The cache is then off: an object in memory has no file to fingerprint."""
        from sts.mixture import candidates as mixture_candidates
        from sts.models import parse_hook_name
        from sts.saes import check_pairing, check_width, load_sae

        self.cfg, self.progress = cfg, progress
        self.sae = sae if sae is not None else load_sae(cfg.sae)
        self.point = parse_hook_name(self.sae.hook_name)
        if lm is None:
            for spec in filter(None, (cfg.model, cfg.tuned_model if cfg.method == "sft" else None)):
                ex.check_fits(self.sae, self.point, spec)
        else:
            check_width(self.sae, lm.hidden_size, lm.spec)
        check_pairing(self.sae, lm.spec if lm is not None else cfg.model)  # the base model only
        self.cache = Cache(cache_root(), cfg.use_cache and lm is None and sae is None)
        # whether the gradient scores read exact training sides: a mixture is predicted from its
        # parts' exact G and v; one set's scores need only their sketches
        self.exact_training = isinstance(cfg.train, list) and any(c.is_mixture for c in mixture_candidates(
            cfg.train, cfg.mix_grid))
        self.base_key = {"v": CACHE_FORMAT, "code": __version__, "model": identity(cfg.model),
                         "sae": identity(cfg.sae), "hook": self.point.name, "max_length": cfg.max_length}
        dtype = cfg.placement.describe()["dtype"]
        if dtype != "float32":  # statistics read in another precision are other statistics
            self.base_key["dtype"] = dtype
        self.adapted: Any = None  # the LoRA-adapted copy the gradient and lookahead scores read (`_adapted`)
        self._engine: ex.Extractor | None = None if lm is None else ex.Extractor(
            lm, self.sae, self.point, cfg.batch_size, cfg.batch_tokens)

    def token_counter(self) -> Callable[[str], int]:
        """Tokens of a text by the model's tokenizer (loaded alone: the model may never be),
        or about 4 characters a token where it cannot load."""
        if self._engine is not None:
            tok = self._engine.lm.tokenizer
        else:
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(self.cfg.model)
            except Exception:  # noqa: BLE001 (an estimate: any failure falls back to characters)
                return lambda text: len(text) // 4
        return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])

    def engine(self) -> ex.Extractor:
        if self._engine is None:
            self.progress(f"loading {self.cfg.model}")
            self._engine = self.extractor(self.cfg.model)
        return self._engine

    def extractor(self, model: str) -> ex.Extractor:
        """An engine for `model` (the base, or a fine-tuned one) with this session's SAE, placement
        and batching."""
        from sts.models import load_model

        p = self.cfg.placement
        return ex.Extractor(load_model(model, p.dtype, p.device, p.device_map), self.sae, self.point,
                            self.cfg.batch_size, self.cfg.batch_tokens)


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
    only_explains = bool(readouts) and not needed  # no score needs the shift pass

    render = training_render(cfg.method)

    def training_shift() -> dict[str, PairedStats]:
        key = shift_key(s, cfg, train)

        def compute_shift(missing: tuple[str, ...]) -> dict[str, PairedStats]:
            e = s.engine()
            progress(f"shift ({cfg.method}) on {len(train.examples)} training examples")
            tuned = s.extractor(cfg.tuned_model or "") if cfg.method == "sft" else None
            own = own_responses(cfg, train, s, progress).examples if cfg.method == "data" else None
            return ex.shift_stats(e, cfg.method, train.examples, render, cfg.demos, cfg.seed, cfg.max_length,
                                  cfg.max_tokens if cfg.method == "paper" else None, tuned, missing, own)

        got = _cached_stats(s.cache, {r: key | {"readout": r} for r in readouts}, compute_shift, PairedStats)
        for stats in got.values():
            if stats.a.count == 0:
                raise UserError(f"no aligned tokens in the training set {train.spec}; check its data")
        return got

    shift: dict[str, PairedStats] = {}
    if only_explains:
        try:
            shift = training_shift()
        except UserError as e:  # the scores stand without their explanation: said, not fatal
            progress(f"warning: no SAE explanation of the ranking ({e})")
    elif readouts:
        shift = training_shift()

    domains_read = domain_render(cfg.first_token)
    per_domain: dict[str, dict[str, FeatureStats]] = {r: {} for r in domain_readouts}
    icl: dict[str, PairedStats] = {}
    for name, exs in domains.items():
        key = domain_key(s, cfg, exs)

        def compute_domain(missing: tuple[str, ...], exs: list[Example] = exs, name: str = name
                           ) -> dict[str, RunStats]:
            unsealed(exs, f"reading domain {name} ({', '.join(missing)})")
            e = s.engine()
            seqs = sequences(exs, e.lm.tokenizer, domains_read, cfg.max_length)
            got = e.stats_many(seqs, missing, len(exs), cfg.max_tokens, desc=f"domain {name}")
            return {r: RunStats(st, meta={"readout": r}) for r, st in got.items()}

        if domain_readouts:
            got = _cached_stats(s.cache, {r: key | {"readout": r} for r in domain_readouts}, compute_domain, RunStats)
            for r, single in got.items():
                if single.a.count == 0:
                    raise no_tokens(f"domain {name}", "it is empty; check its data")
                per_domain[r][name] = single.a
        if domain_pairs and demos is not None:
            shown = demos.demos[name]
            icl_key = s.base_key | {"kind": "domain-icl", "render": asdict(domains_read),
                                    "examples": _examples_hash(exs), "demos": _examples_hash(list(shown)),
                                    "max_tokens": cfg.max_tokens}

            def compute_icl(exs: list[Example] = exs, name: str = name) -> PairedStats:
                unsealed(exs, f"the icl score of domain {name}")
                return ex.domain_shift_stats(s.engine(), exs, {name: demos.demos[name]}, domains_read,
                                             cfg.max_length, cfg.max_tokens, desc=f"domain {name} (icl)")

            icl[name] = _cached_stats(s.cache, {"": icl_key}, lambda _missing: {"": compute_icl()}, PairedStats)[""]
    text = None
    if texts:
        unsealed((e for exs in domains.values() for e in exs), "the lexical score")
        text = (training_text(train.examples), {d: domain_text(exs) for d, exs in domains.items()})
    gradients = None
    records = domains if gradient_domains is None else gradient_domains
    if any(spec_of(name).reads("gradients") for name in scores):
        gradients = _gradients(cfg, train, records, s, progress)
    ahead = [name for name in scores if spec_of(name).reads("lookahead")]
    looked = _lookahead_scores(cfg, train, records, tuple(ahead), s, progress) if ahead else {}
    return Extraction(s.point.name, shift, per_domain, icl, text, {d: len(e) for d, e in domains.items()}, demos,
                      gradients, looked)


def shift_key(session: Session, cfg: PredictConfig, train: Dataset) -> dict[str, Any]:
    """The cache key of the training set's shift statistics (one entry per readout adds "readout")."""
    generation = {"generation": asdict(cfg.generation)} if cfg.method == "data" else {}
    return session.base_key | generation | {
        "kind": "shift", "method": cfg.method, "render": asdict(training_render(cfg.method)),
        "examples": _examples_hash(train.examples), "demos": cfg.demos, "seed": cfg.seed,
        "tuned": identity(cfg.tuned_model or ""), "max_tokens": cfg.max_tokens if cfg.method == "paper" else None}


# Tokens per second of a forward pass to the hooked layer on one CPU thread, measured where the
# plan line matters most: the embedded default's cold run (icl pairs of ~830 tokens with their
# demonstrations, SmolLM2-135M to layer 22) read 97k tokens in 268 s on 2 threads
# (benchmarks/predict_speed.py, 2026-11-30). Short sequences read faster (~450 a thread:
# benchmarks/extract_speed.py), so the plan line says "about" and errs long for them.
CPU_TOKENS_PER_THREAD_S = 180
# The gradient scores' backward passes on the same machine (benchmarks/predict_speed.py --score
# grad, 2026-11-30): CHAMP's 100 training examples, 27.6k tokens one example a pass, in 262 s;
# the 14 MMLU domains' 77.6k tokens, in padded batches, in about 740 s: ~52 tokens/s a thread.
CPU_BACKWARD_TOKENS_PER_THREAD_S = 50


def plan(cfg: PredictConfig, sets: dict[str, Dataset], domains: dict[str, list[Example]], session: Session) -> str:
    """One line saying what this prediction will compute and roughly how long it will take,
    from the token count of what is not cached."""
    needed, domain_readouts, _pairs, _texts = needs((cfg.score,))
    readouts = with_explanation(cfg, (cfg.score,), needed)

    def shift_missing(ds: Dataset) -> bool:
        return bool(readouts) and not all(session.cache.has(shift_key(session, cfg, ds) | {"readout": r})
                                          for r in readouts)

    count = session.token_counter()
    tokens, todo = 0, []
    backward = 0  # tokens of the gradient scores' backward passes (slower per token than a forward)
    if spec_of(cfg.score).reads("gradients"):
        train_missing = [(spec, ds) for spec, ds in sets.items()
                         if not gradient_train_cached(session, cfg, ds)]
        grad_domains = [d for d, exs in domains.items() if not gradient_domain_cached(session, cfg, d, exs)]
        for spec, ds in train_missing:
            backward += sum(count(e.prompt + (e.response or "")) for e in ds.examples)
            todo.append(f"the gradients of {len(ds.examples)} examples of {spec}")
        unsealed((e for d in grad_domains for e in domains[d]),
                 f"the gradient side of domain(s) {', '.join(grad_domains)} under these settings")
        backward += sum(count(e.prompt + (e.cot or "")) for d in grad_domains for e in domains[d])
        if grad_domains:
            todo.append(f"the gradients of {len(grad_domains)} of {len(domains)} domains")
    if spec_of(cfg.score).reads("lookahead"):
        more, todo_ahead = _lookahead_plan(cfg, sets, domains, session)
        backward += more
        todo += todo_ahead
    for spec, ds in sets.items():
        if shift_missing(ds):
            sides = 2 + cfg.demos if cfg.method == "icl" else 2  # an icl pair: the example twice, its demos once
            tokens += sides * sum(count(e.prompt + (e.response or "")) for e in ds.examples)
            todo.append(f"the shift of {len(ds.examples)} examples of {spec}")
    missing = [d for d, exs in domains.items()
               if domain_readouts and not all(session.cache.has(domain_key(session, cfg, exs) | {"readout": r})
                                              for r in domain_readouts)]
    unsealed((e for d in missing for e in domains[d]), f"reading domain(s) {', '.join(missing)} under these settings")
    tokens += sum(count(e.prompt) for d in missing for e in domains[d])
    if missing:
        todo.append(f"{len(missing)} of {len(domains)} domains")
    if not todo:
        return "every statistic this prediction needs is cached (or shipped): no model pass"
    threads = torch.get_num_threads()
    where = cfg.placement.describe()
    seconds = tokens / (CPU_TOKENS_PER_THREAD_S * threads) + backward / (CPU_BACKWARD_TOKENS_PER_THREAD_S * threads)
    tokens += backward
    eta = (f"about {max(1, round(seconds / 60))} min on {threads} CPU threads" if where["device"] == "cpu"
           else f"on {where['device']}: well under the CPU's {max(1, round(seconds / 60))} min")
    generates = (cfg.method == "data" or cfg.responses == "generated") and not all(
        session.cache.has(generated_key(session, cfg, ds), ".json") for ds in sets.values())
    extra = ", plus generating the model's own responses" if generates else ""
    return f"to compute: {'; '.join(todo)} (~{tokens // 1000}k tokens; {eta}{extra})"


def _lookahead_plan(cfg: PredictConfig, sets: dict[str, Dataset], domains: dict[str, list[Example]],
                    session: Session) -> tuple[int, list[str]]:
    """(backward-pass tokens, what to compute) of a lookahead score: the run's steps (a step of
    `batch_size` examples counted as a backward pass over them), the training gradient (line),
    the domains' gradient sides (look-fo) or two forward passes over their records (line, look)."""
    count = session.token_counter()
    direction = spec_of(cfg.score).direction
    tokens, todo = 0, []
    for spec, ds in sets.items():
        per_example = sum(count(e.prompt + (e.response or "")) for e in ds.examples) / max(1, len(ds.examples))
        if direction == "line":
            if not session.cache.has(gradient_train_key(session, cfg, ds)):
                tokens += int(per_example * len(ds.examples))
                todo.append(f"the gradients of {len(ds.examples)} examples of {spec}")
        elif not session.cache.has(gradient_train_key(session, cfg, ds) | {"kind": "lookahead", "steps": cfg.steps}):
            tokens += int(per_example * cfg.steps * cfg.finetune.batch_size * cfg.finetune.grad_accum)
            todo.append(f"{cfg.steps} optimizer steps of the fine-tuning run on {spec}")
    if direction == "look-fo":
        missing = [d for d, exs in domains.items() if not gradient_domain_cached(session, cfg, d, exs)]
        tokens += sum(count(e.prompt + (e.cot or "")) for d in missing for e in domains[d])
        if missing:
            todo.append(f"the gradients of {len(missing)} of {len(domains)} domains")
    else:  # a forward pass is about a third of a backward one
        tokens += 2 * len(sets) * sum(count(e.prompt + (e.cot or "")) for q in domains.values() for e in q) // 3
        todo.append(f"each domain's loss at the start and {cfg.steps} steps out")
    return tokens, todo


def domain_key(session: Session, cfg: PredictConfig, exs: list[Example]) -> dict[str, Any]:
    """The cache key of one domain's statistics (one entry per readout adds "readout")."""
    return session.base_key | {"kind": "domain", "render": asdict(domain_render(cfg.first_token)),
                               "examples": _examples_hash(exs), "max_tokens": cfg.max_tokens}


def _gradients(cfg: PredictConfig, train: Dataset, domains: dict[str, list[Example]], s: Session,
               progress: Callable[[str], None]) -> GradientStats:
    """The gradient scores' statistics, cached apart: the training side by model, examples and
    LoRA spec; each domain's side by model, its records and the adapter's initialisation, so
    that another training set (a comparison's next candidate) reuses the domains' backward
    passes, and an interrupted run keeps the domains it finished."""
    from sts.gradients import TrainingGradients

    tdim = training_sketch(s, cfg)
    if tdim:
        t = s.cache.get_or_compute_many(
            {"": gradient_train_key(s, cfg, train, tdim)},
            lambda _m: {"": _exact_training_side(cfg, train, s, progress).sketched(tdim)},
            TrainingGradients.load, lambda g, path: g.save(path))[""]
    else:
        t = _exact_training_side(cfg, train, s, progress)
    return GradientStats.join(t, _domain_sides(cfg, domains, s, progress))


def _adapted(s: Session, cfg: PredictConfig) -> Any:
    """The adapted copy of the model (`gradients.adapted`), built once a session and only if needed."""
    if s.adapted is None:
        from sts.gradients import adapted

        s.adapted = adapted(s.engine().lm, cfg.finetune)
    return s.adapted


def _exact_training_side(cfg: PredictConfig, train: Dataset, s: Session, progress: Callable[[str], None]) -> Any:
    from sts.gradients import TrainingGradients, training_side

    return s.cache.get_or_compute_many(
        {"": gradient_train_key(s, cfg, train)},
        lambda _m: {"": training_side(s.engine().lm, _adapted(s, cfg), train.examples, cfg.finetune, progress)},
        TrainingGradients.load, lambda g, path: g.save(path))[""]


def _domain_sides(cfg: PredictConfig, domains: dict[str, list[Example]], s: Session,
                  progress: Callable[[str], None]) -> Any:
    """Each domain's gradient side, sketched to cfg.gradient_sketch (read where shipped or cached)."""
    from sts.gradients import DomainGradients, domain_side

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
    from sts.data import SealedExample
    from sts.lookahead import check_steps

    check_steps(cfg.steps, cfg.finetune)
    spec = spec_of(cfg.score)
    if spec.reads_texts and any(isinstance(e, SealedExample) for q in domains.values() for e in q):
        raise UserError(f"--score {cfg.score} reads each domain's loss on its records, and the embedded reference "
                        "domains ship no text: use --score look-fo (the same run's steps against the shipped "
                        "gradient sides), or give --domains a file of records with reference chains of thought")


def _lookahead_scores(cfg: PredictConfig, train: Dataset, domains: dict[str, list[Example]], names: tuple[str, ...],
                      s: Session, progress: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """line, look and look-fo (`sts.lookahead`): the run's first cfg.steps optimizer steps (cached
    by model, examples, recipe and steps), then each domain's loss there (forward passes) or the
    displacement against the domain's gradient side."""
    from sts.gradients import domain_losses, sketch
    from sts.lookahead import Lookahead, drops, flat_state, line_point, lookahead, moved_losses

    k = cfg.steps
    directions = {spec_of(n).direction for n in names}
    look = None
    if directions & {"look", "look-fo"}:
        look = s.cache.get_or_compute_many(
            {"": gradient_train_key(s, cfg, train) | {"kind": "lookahead", "steps": k}},
            lambda _m: {"": lookahead(s.engine().lm, train.examples, cfg.finetune, (k,), progress)},
            Lookahead.load, lambda g, path: g.save(path))[""]
    base: dict[str, float] = {}
    if directions & {"line", "look"}:
        from sts.files import atomic_path
        from sts.gradients import domain_side_key

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
            g = _exact_training_side(cfg, train, s, progress).mean
            state = line_point(cfg.finetune, g, flat_state(_adapted(s, cfg)), k)
        progress(f"{name}: each domain's loss {k} steps out")
        out[name] = drops(base, moved_losses(s.engine().lm, cfg.finetune, domains, {name: state})[name])
    return out


def gradient_train_key(s: Session, cfg: PredictConfig, train: Dataset, sketch: int = 0) -> dict[str, Any]:
    """The cache key of a training set's gradient side (G and v; sketched to `sketch`)."""
    from sts.gradients import SKETCH_SEED

    key = s.base_key | {"kind": "gradients-train", "examples": _examples_hash(train.examples),
                        "finetune": asdict(cfg.finetune)}
    # sketched, the side holds one sketch per direction the scores take (grad, grad-adam, grad-sign)
    return key | {"sketch": sketch, "sketch_seed": SKETCH_SEED, "directions": ["G", "adam", "sign"]} if sketch else key


def training_sketch(s: Session, cfg: PredictConfig) -> int:
    """The dimension the training side is read sketched to (0: exact). Sketched, it serves one
    set's scores (and ships for the embedded default); a mixture mixes its parts' exact sides."""
    return 0 if s.exact_training else cfg.gradient_sketch


def gradient_train_cached(s: Session, cfg: PredictConfig, train: Dataset) -> bool:
    """Whether the training side can be read, not computed (sketched where that serves, or exact)."""
    dim = training_sketch(s, cfg)
    return bool(dim and s.cache.has(gradient_train_key(s, cfg, train, dim))) or s.cache.has(
        gradient_train_key(s, cfg, train))


def gradient_domain_key(s: Session, cfg: PredictConfig, domain: str, exs: list[Example], sketch: int = 0
                        ) -> dict[str, Any]:
    """The cache key of one domain's gradient side: its records and the adapter's initialisation
    only, so that every training set of one LoRA spec reuses it; exact, or sketched to `sketch`."""
    from sts.gradients import SKETCH_SEED, domain_side_key

    key = s.base_key | {"kind": "gradients-domain", "domain": domain, "records": _examples_hash(exs),
                        "adapter": domain_side_key(cfg.finetune)}
    key |= {"loss": "content"} if cfg.gradient_content else {}
    return key | {"sketch": sketch, "sketch_seed": SKETCH_SEED} if sketch else key


def gradient_domain_cached(s: Session, cfg: PredictConfig, domain: str, exs: list[Example]) -> bool:
    """Whether a domain's side can be read, not computed: sketched (cached or shipped), or exact."""
    return bool(cfg.gradient_sketch and s.cache.has(gradient_domain_key(s, cfg, domain, exs, cfg.gradient_sketch))
                ) or s.cache.has(gradient_domain_key(s, cfg, domain, exs))


def score_extraction(cfg: PredictConfig, extraction: Extraction, score: str
                     ) -> tuple[dict[str, float], dict[str, int], Any, ShiftSamples | None]:
    """(domain -> score, domain -> tokens scored, the Shift behind it or None, bootstrap samples)."""
    spec = spec_of(check_score(score))
    out = spec.kind.compute(spec, extraction, cfg.k)
    return out.scores, out.tokens, out.shift, out.samples


@dataclass
class Prepared:
    """A prediction's inputs, loaded and checked, before any extraction: the config (the
    embedded model and SAE filled in), the training sets by spec, the domains, the domain
    demonstrations, the session and the libraries."""

    cfg: PredictConfig
    sets: dict[str, Dataset]
    domains: dict[str, list[Example]]
    demos: DomainDemos | None
    session: Session
    libs: Libraries
    score_note: str = ""  # how the score was chosen, where none was given (said beside the plan line)

    @property
    def several(self) -> bool:
        return isinstance(self.cfg.train, list)

    def announce(self, progress: Callable[[str], None]) -> None:
        """How the score was chosen (where none was given), then what will be computed (`plan`)."""
        if self.score_note:
            progress(self.score_note)
        progress(plan(self.cfg, self.sets, self.domains, self.session))


def predict(cfg: PredictConfig | None = None, train: Dataset | None = None,
            domains: dict[str, list[Example]] | None = None, progress: Callable[[str], None] = lambda _m: None,
            demos: DomainDemos | None = None, *, model: Any = None, tokenizer: Any = None, sae: Any = None
            ) -> Prediction:
    """One training set's prediction (`sts.predict`, i.e. `sts.compare.predict`, also takes
    several sets and mixtures); arguments as `prepare`'s."""
    p = prepare(cfg, train, domains, progress, demos, model=model, tokenizer=tokenizer, sae=sae)
    if p.several:
        raise UserError("several training sets (or a mixture): call sts.predict (sts.compare.predict)")
    p.announce(progress)
    return single(p, progress)


def single(p: Prepared, progress: Callable[[str], None]) -> Prediction:
    """Extract, score, split and calibrate one training set."""
    spec = next(iter(p.sets))
    ds = responses(p.cfg, p.sets[spec], p.session, progress)
    extraction = extract_all(p.cfg, ds, p.domains, (p.cfg.score,), p.demos, progress, p.session)
    pred = prediction(p.cfg, extraction, p.cfg.score, ds, p.session)
    reused(p.session, progress)
    return p.libs.apply(pred, [spec])


def prepare(cfg: PredictConfig | None = None, train: Dataset | None = None,
            domains: dict[str, list[Example]] | None = None, progress: Callable[[str], None] = lambda _m: None,
            demos: DomainDemos | None = None, *, model: Any = None, tokenizer: Any = None, sae: Any = None
            ) -> Prepared:
    """Shift statistics of the training set, per-domain statistics, then the score per domain.

    The Python API: `train`/`domains` default to `cfg.train`/`cfg.domains` read as the CLI
    reads them (`cfg.max_train` examples; `cfg.max_examples` questions per domain, training
    questions left out); `model` + `tokenizer` (a transformers causal LM and its tokenizer,
    on any device and in any dtype) and `sae` (a sae_lens SAE) are used as given instead of
    loading `cfg.model`/`cfg.sae`. For the icl score without `demos`, demonstrations come from
    `cfg.domain_demos`, or from each domain's first `cfg.domain_demos_n` questions, which are
    then not scored.

    Loads what the prediction reads and checks it (bad input fails here, before any model
    pass); `predict` / `sts.compare.predict` then run it."""
    from sts.data import sets_and_domains

    cfg = cfg or PredictConfig()
    if (model is None) != (tokenizer is None):
        raise UserError("pass model and tokenizer together (a transformers causal LM and its tokenizer)")
    several = isinstance(cfg.train, list)
    if several and train is not None:
        raise UserError("several training sets are named in cfg.train (a list of specs), not passed as `train`")
    specs = candidate_specs(cfg)
    sets: dict[str, Dataset] = {}
    if train is not None:
        sets = {specs[0]: train}
    if train is None or domains is None:
        extra = cfg.domain_demos_n if cfg.score and uses_domain_demos(cfg.score) and demos is None else 0
        loaded_sets, loaded_domains = sets_and_domains(
            specs, cfg.domains, cfg.max_train, None if cfg.max_examples is None else cfg.max_examples + extra,
            cfg.skip_bad_lines)
        sets, domains = sets or loaded_sets, domains or loaded_domains
    chosen = ""
    if not cfg.score:
        cfg = dataclasses.replace(cfg, score=score_for(domains))
        chosen = (f"score {cfg.score}: {'every' if cfg.score == DEFAULT_SCORE else 'not every'} domain record holds a "
                  "reference chain of thought (--score chooses another)")
    cfg.refuse_unused_for_score()
    if uses_domain_demos(cfg.score) and demos is None:
        demos, domains = domain_demonstrations(domains, cfg.domain_demos_n, cfg.domain_demos, cfg.skip_bad_lines)
        if cfg.max_examples is not None:
            domains = {d: q[: cfg.max_examples] for d, q in domains.items()}
    _, _, domain_pairs, texts = needs((cfg.score,))
    if texts or domain_pairs:  # sealed domains ship no text: refused before a model is built
        unsealed((e for q in domains.values() for e in q), f"the {cfg.score} score")
    if spec_of(cfg.score).reads("lookahead"):
        check_lookahead(cfg, domains)
    if cfg.model == "" and model is None or cfg.sae == "" and sae is None:
        from sts.embedded import default_sae_dir
        from sts.models import default_model_dir

        cfg = dataclasses.replace(cfg, model=cfg.model or (str(default_model_dir()) if model is None else ""),
                                  sae=cfg.sae or (str(default_sae_dir()) if sae is None else ""))
    lm = loaded_sae = None
    if model is not None:
        from sts.models import LoadedModel

        if tokenizer.pad_token_id is None:  # padding is masked out; any id will do
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
        lm = LoadedModel(model.eval(), tokenizer, cfg.model or getattr(model, "name_or_path", "model"))
    if sae is not None:
        from sts.saes import LoadedSAE

        loaded_sae = LoadedSAE(sae.eval(), cfg.sae or "sae")
    # before anything loads: a library that cannot serve fails here, one of another side is left out
    side = side_label(spec_of(cfg.score).run_based, cfg.domains, (e for q in domains.values() for e in q))
    lib, note = library(cfg, side)
    cal_lib, cal_note = calibration_library(cfg, lib, side)
    libs = Libraries(lib, note, cal_lib, cal_note, bool(cfg.calibrate), side)
    session = Session(cfg, progress, lm, loaded_sae)
    check_extraction(cfg, domains, (cfg.score,), demos, session)  # bad input fails before the plan line
    return Prepared(cfg, sets, domains, demos, session, libs, chosen)


def score_for(domains: dict[str, list[Example]]) -> str:
    """The score `sts predict` reads when none is given, by what the domains' records hold: the
    default (grad) where every record has a reference chain of thought (the validated form; a
    sealed embedded record is one), else `defaults.PLAIN_SCORE` (docs/results/plain's rule)."""
    from sts.data import has_reference

    refs = all(has_reference(e) for q in domains.values() for e in q)
    return DEFAULT_SCORE if refs else defaults.PLAIN_SCORE


def reused(session: Session, progress: Callable[[str], None]) -> None:
    """Say what came from the cache (and what shipped with the package)."""
    hits = session.cache.hits
    if hits:
        shipped = hits.count("shipped")
        progress(f"reused {len(hits)} cached entr{'y' if len(hits) == 1 else 'ies'}"
                 + (f" ({shipped} shipped with sts)" if shipped else ""))


def candidate_specs(cfg: PredictConfig) -> list[str]:
    """The distinct dataset specs that `cfg.train` names (a mixture's parts without weights)."""
    if not isinstance(cfg.train, list):
        return [cfg.train]
    from sts.mixture import candidates

    return list(dict.fromkeys(p.spec for c in candidates(cfg.train, cfg.mix_grid) for p in c.parts))


@dataclass
class Libraries:
    """What measured runs add to a prediction: the shared/own split and the calibration."""

    decomposition: Library | None
    decomposition_note: str
    calibration: Library | None
    calibration_note: str
    calibration_asked: bool = False  # --calibrate given: a library that cannot calibrate is bad input
    side: str = ""  # what the prediction's domain side reads (`library.side_label`)

    def apply(self, pred: Prediction, parts: list[str]) -> Prediction:
        """Split and calibrate `pred`, leaving the library's runs of its own sets (`parts`) out."""
        from sts.calibration import from_library, judge

        pred.side = self.side
        if self.decomposition is not None:
            pred.decomposition = decompose(self.decomposition, pred.score, pred.scores, leave_out=parts)
        pred.decomposition_note = self.decomposition_note
        pred.calibration_note = self.calibration_note
        if self.calibration is not None:
            try:
                pred.calibrations = from_library(self.calibration, pred.score, leave_out=parts)
                pred.changes = {m: c.predict(pred.scores) for m, c in pred.calibrations.items()}
                pred.calibration_checks = judge(self.calibration, pred.score, leave_out=parts)
            except UserError as exc:
                if self.calibration_asked:
                    raise
                pred.calibration_note = f"no calibration: {exc}"
        return pred


def library(cfg: PredictConfig, side: str) -> tuple[Library | None, str]:
    """The library that splits the prediction into shared and own parts (`sts.library`), or
    None and why not (the default one when it does not fit; a library asked for must fit)."""
    from sts.embedded import LIBRARIES, default_library

    if cfg.library == "":
        return None, ""
    path = cfg.library if cfg.library is not None else default_library(cfg.sae, cfg.domains)
    if path is None:  # with the embedded SAE, say why the shipped libraries do not serve these domains
        shipped = [d for d in LIBRARIES if default_library(cfg.sae, d) is not None]
        return None, (f"no shared/own decomposition: the shipped libraries hold scores read on {', '.join(shipped)}, "
                      f"not on {cfg.domains}; `sts validate` on your domains makes one (--library)") if shipped else ""
    lib = Library.load(path)
    why = check_library(lib, cfg.sae, cfg.score, cfg.k, cfg.model)
    if why is not None and cfg.library is not None:  # asked for: a library that cannot serve is bad input
        raise UserError(f"--library: {why}; build one with `sts validate` on this model, SAE, score and k")
    why = why or side_mismatch(lib, cfg.score, side)  # another kind of domain side: said, never mixed
    return (lib, "") if why is None else (None, f"no shared/own decomposition: {why}")


def calibration_library(cfg: PredictConfig, lib: Library | None, side: str) -> tuple[Library | None, str]:
    """The runs that calibrate this prediction: `cfg.calibrate`'s libraries merged (each must
    come from this model, SAE, score and k: else exit 2; one whose domain side is of another kind
    is left out, and said), or the decomposition's library."""
    if cfg.calibrate is None:
        return lib, ""
    if not cfg.calibrate:
        return None, ""
    merged: Library | None = None
    for path in cfg.calibrate:
        one = Library.load(path)
        why = check_library(one, cfg.sae, cfg.score, cfg.k, cfg.model)
        if why is not None:
            raise UserError(f"--calibrate: {why}; calibrate with `sts validate` runs on this model, SAE, score and k")
        if (other := side_mismatch(one, cfg.score, side)) is not None:
            return None, f"no calibration: {other}"
        if merged is None:
            merged = one
            continue
        if one.metric != merged.metric:
            raise UserError(f"--calibrate: {path} measures {one.metric}, {merged.source} {merged.metric}; "
                            "give libraries of one metric")
        for name, s in one.sets.items():
            merged.sets[name if name not in merged.sets else f"{path}:{name}"] = s
        merged.source = f"{merged.source}, {path}"
    return merged, ""


def responses(cfg: PredictConfig, train: Dataset, session: Session,
              progress: Callable[[str], None] = lambda _m: None) -> Dataset:
    """The training set whose responses the shift reads: as given, or (`generated`) the base
    model's own answers to its prompts."""
    return train if cfg.responses == "dataset" else own_responses(cfg, train, session, progress)


def generated_key(session: Session, cfg: PredictConfig, train: Dataset) -> dict[str, Any]:
    """The cache key of the base model's own answers to the training prompts."""
    return session.base_key | {"kind": "generated", "examples": _examples_hash(train.examples),
                               "generation": asdict(cfg.generation)}


def own_responses(cfg: PredictConfig, train: Dataset, session: Session,
                  progress: Callable[[str], None] = lambda _m: None) -> Dataset:
    """The training prompts with the base model's own answers, sampled as `cfg.generation` says
    and cached by model, prompts and sampling settings."""
    from sts.generate import generated_responses

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


def contexts_key(session: Session, cfg: PredictConfig, train: Dataset, features: list[int]) -> dict[str, Any]:
    """The cache key of the shown features' top contexts in the training set's first examples."""
    return session.base_key | {"kind": "contexts", "features": features, "n": cfg.top_contexts,
                               "examples": _examples_hash(train.examples[: defaults.CONTEXT_EXAMPLES]),
                               "render": asdict(training_render(cfg.method))}


def prediction(cfg: PredictConfig, extraction: Extraction, score: str, train: Dataset,
               session: Session | None = None) -> Prediction:
    """One score of an Extraction as a Prediction (with top contexts of the shifted SAE features)."""
    scores, tokens, shift, samples = score_extraction(cfg, extraction, score)
    on_sae = spec_of(score).readout == Readout.SAE
    if shift is None and explains(cfg, (score,)) and Readout.SAE in extraction.shift:
        values = extraction.shift[Readout.SAE].sum_sq_diff.double()  # STS_act's selection of S
        shift, on_sae = Shift(values, top_features(values, min(cfg.k, values.shape[0]))), True  # only shown
    features: list[FeatureReport] = []
    if shift is not None:
        contexts: dict[int, list[dict[str, Any]]] = {}
        if cfg.top_contexts > 0 and on_sae and session is not None:
            sample = train.examples[: defaults.CONTEXT_EXAMPLES]  # a bounded read: contexts only illustrate
            contexts = session.cache.get_or_compute_json(
                contexts_key(session, cfg, train, shift.features),
                lambda: _contexts(session.engine(), sample, training_render(cfg.method), shift.features, cfg))
        features = [FeatureReport(j, float(shift.values[j]), contexts.get(j, []))
                    for j in shift.features]
    readout = spec_of(score).readout
    train_tokens = extraction.shift[readout].a.count if readout else 0
    if spec_of(score).reads("gradients") and extraction.gradients is not None:
        train_tokens = extraction.gradients.tokens
    truncation = {}
    if readout and "truncation" in extraction.shift[readout].meta:
        truncation["train"] = extraction.shift[readout].meta["truncation"]
    if uses_domain_demos(score):
        truncation["domains"] = {d: st.meta.get("truncation", {}) for d, st in extraction.domain_icl.items()}
    generated = ([{"id": e.uid, "prompt": e.prompt, "response": e.response or ""} for e in train.examples]
                 if cfg.responses == "generated" else None)
    return Prediction(config=dataclasses.replace(cfg, score=score), hook=extraction.hook, scores=scores,
                      tokens=tokens, questions=dict(extraction.questions), train_tokens=train_tokens, features=features,
                      samples=samples, score=score, demonstrations=extraction.demos.describe()
                      if uses_domain_demos(score) and extraction.demos else None,
                      truncation=truncation, generated=generated)


def _contexts(engine: ex.Extractor, examples: list[Example], render: Render, features: list[int],
              cfg: PredictConfig) -> dict[int, list[dict[str, Any]]]:
    tok = engine.lm.tokenizer
    seqs = list(sequences(examples, tok, render, cfg.max_length))
    return top_contexts(engine, seqs, features, cfg.top_contexts, tok)
