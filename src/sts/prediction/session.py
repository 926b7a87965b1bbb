"""A prediction's session: the model and SAE loaded once (`Session`), and the cache key of
everything it extracts (each key names everything that determines its entry).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sts import __version__, defaults
from sts.cache import Cache, cache_root, fingerprint
from sts.data.examples import Dataset, Example
from sts.data.inputs import domain_render, training_render
from sts.engine import distributed as dist
from sts.engine import extract as ex
from sts.engine.stats import PairedStats, RunStats, load_stats
from sts.prediction.config import PredictConfig

# Bump when extraction semantics change (3: per-example shifts; 4: ICL pairs keep their
# demonstrations whole and cut the example; readouts; domain ICL pairs).
CACHE_FORMAT = 4


S = TypeVar("S", RunStats, PairedStats)


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


def identity(spec: str) -> str:
    """A model or SAE spec's identity for cache keys: the embedded model and SAE by what they
    are, not where they sit (the GGUF's sha256 for the model rebuilt from it, whose weights'
    mtime differs on every machine; the SAE's files), so that the embedded default's
    statistics have one key everywhere and can ship with the package (`sts.cache.SHIPPED`);
    anything else by `sts.cache.fingerprint`."""
    from sts.cache import DEFAULT_MODEL_DIRNAME, hash_path
    from sts.data.embedded import GGUF, SAE_DIR

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
        from sts.engine.mixture import candidates as mixture_candidates
        from sts.engine.models import parse_hook_name
        from sts.engine.saes import check_pairing, check_width, load_sae

        self.cfg, self.progress = cfg, progress
        self.sae = sae if sae is not None else load_sae(cfg.sae)
        self.point = parse_hook_name(self.sae.hook_name)
        if lm is None:
            for spec in filter(None, (cfg.model, cfg.tuned_model if cfg.method == "sft" else None)):
                ex.check_fits(self.sae, self.point, spec)
        else:
            check_width(self.sae, lm.hidden_size, lm.spec)
        check_pairing(self.sae, lm.spec if lm is not None else cfg.model)  # the base model only
        # under a launcher's processes the main one writes the cache and all compute what it lacks
        self.world = dist.world()
        self.cache = Cache(cache_root(), cfg.use_cache and lm is None and sae is None, writes=self.world.main,
                           agree=lambda names: dist.agree(names, self.world), sync=lambda: dist.barrier(self.world))
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
            lm, self.sae, self.point, cfg.batch_size, cfg.batch_tokens, self.world)

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
        from sts.engine.models import load_model

        p = self.cfg.placement
        return ex.Extractor(load_model(model, p.dtype, p.device, p.device_map), self.sae, self.point,
                            self.cfg.batch_size, self.cfg.batch_tokens, self.world)


def shift_key(session: Session, cfg: PredictConfig, train: Dataset) -> dict[str, Any]:
    """The cache key of the training set's shift statistics (one entry per readout adds "readout")."""
    generation = {"generation": asdict(cfg.generation)} if cfg.method == "data" else {}
    return session.base_key | generation | {
        "kind": "shift", "method": cfg.method, "render": asdict(training_render(cfg.method)),
        "examples": _examples_hash(train.examples), "demos": cfg.demos, "seed": cfg.seed,
        "tuned": identity(cfg.tuned_model or ""), "max_tokens": cfg.max_tokens if cfg.method == "paper" else None}


def domain_key(session: Session, cfg: PredictConfig, exs: list[Example]) -> dict[str, Any]:
    """The cache key of one domain's statistics (one entry per readout adds "readout")."""
    return session.base_key | {"kind": "domain", "render": asdict(domain_render(cfg.first_token)),
                               "examples": _examples_hash(exs), "max_tokens": cfg.max_tokens}


def lookahead_key(s: Session, cfg: PredictConfig, train: Dataset) -> dict[str, Any]:
    """The cache key of a training set's first `cfg.steps` optimizer steps. Under several processes
    the steps are the trainer's data-parallel run (`sts finetune`'s under the same launcher), whose
    sampler orders the batches its own way: another run, so another entry."""
    run = {"processes": s.world.size} if s.world.size > 1 else {}
    return gradient_train_key(s, cfg, train) | {"kind": "lookahead", "steps": cfg.steps} | run


def gradient_train_key(s: Session, cfg: PredictConfig, train: Dataset, sketch: int = 0) -> dict[str, Any]:
    """The cache key of a training set's gradient side (G and v; sketched to `sketch`)."""
    from sts.engine.gradients import SKETCH_SEED

    key = s.base_key | {"kind": "gradients-train", "examples": _examples_hash(train.examples),
                        "finetune": asdict(cfg.finetune)}
    # sketched, the side holds one sketch per direction the scores take (grad, grad-adam, grad-sign),
    # and each example's sketched row (`grad`'s terms: the prediction's attribution)
    return key | {"sketch": sketch, "sketch_seed": SKETCH_SEED, "directions": ["G", "adam", "sign"],
                  "rows": sketch} if sketch else key


def training_sketch(s: Session, cfg: PredictConfig) -> int:
    """The dimension the training side is read sketched to (0: exact). Sketched, it serves one
    set's scores (and ships for the embedded default); a mixture mixes its parts' exact sides."""
    return 0 if s.exact_training else cfg.gradient_sketch


def exact_train_key(s: Session, cfg: PredictConfig, train: Dataset, rows: int = 0,
                    records: dict[str, list[Example]] | None = None) -> dict[str, Any]:
    """The cache key of the exact training side (G, v) as a prediction computes it: with each
    example's row sketched to `rows`, or (exact scores, `records` the domains' records) with its
    products against those domains' exact sides, keyed by theirs; a mixture's parts have neither."""
    key = gradient_train_key(s, cfg, train)
    if rows:
        return key | {"rows": rows}
    if records is not None:
        return key | {"products": {d: gradient_domain_key(s, cfg, d, exs) for d, exs in records.items()}}
    return key


def gradient_train_cached(s: Session, cfg: PredictConfig, train: Dataset, records: dict[str, list[Example]]) -> bool:
    """Whether the training side can be read, not computed: sketched (or its exact side with the
    rows), exact with its products against `records`' domains, or a mixture part's exact side."""
    dim = training_sketch(s, cfg)
    if dim:
        return s.cache.has(gradient_train_key(s, cfg, train, dim)) or s.cache.has(exact_train_key(s, cfg, train, dim))
    return s.cache.has(exact_train_key(s, cfg, train, records=None if s.exact_training else records))


def gradient_domain_key(s: Session, cfg: PredictConfig, domain: str, exs: list[Example], sketch: int = 0
                        ) -> dict[str, Any]:
    """The cache key of one domain's gradient side: its records and the adapter's initialisation
    only, so that every training set of one LoRA spec reuses it; exact, or sketched to `sketch`."""
    from sts.engine.gradients import SKETCH_SEED, domain_side_key

    key = s.base_key | {"kind": "gradients-domain", "domain": domain, "records": _examples_hash(exs),
                        "adapter": domain_side_key(cfg.finetune)}
    key |= {"loss": "content"} if cfg.gradient_content else {}
    return key | {"sketch": sketch, "sketch_seed": SKETCH_SEED} if sketch else key


def gradient_domain_cached(s: Session, cfg: PredictConfig, domain: str, exs: list[Example]) -> bool:
    """Whether a domain's side can be read, not computed: sketched (cached or shipped), or exact."""
    return bool(cfg.gradient_sketch and s.cache.has(gradient_domain_key(s, cfg, domain, exs, cfg.gradient_sketch))
                ) or s.cache.has(gradient_domain_key(s, cfg, domain, exs))


def generated_key(session: Session, cfg: PredictConfig, train: Dataset) -> dict[str, Any]:
    """The cache key of the base model's own answers to the training prompts."""
    return session.base_key | {"kind": "generated", "examples": _examples_hash(train.examples),
                               "generation": asdict(cfg.generation)}


def contexts_key(session: Session, cfg: PredictConfig, train: Dataset, features: list[int]) -> dict[str, Any]:
    """The cache key of the shown features' top contexts in the training set's first examples."""
    return session.base_key | {"kind": "contexts", "features": features, "n": cfg.top_contexts,
                               "examples": _examples_hash(train.examples[: defaults.CONTEXT_EXAMPLES]),
                               "render": asdict(training_render(cfg.method))}
