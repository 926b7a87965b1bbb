"""`sts predict`: training set -> shifted features -> STS per domain -> ranking and report.

Extraction results are cached under `cache_root()/extract`, keyed by everything that
determines them (model files, SAE weights, the examples themselves, demonstrations, token
selection, layer, limits, code version). Each entry carries its own key and a sha256 of its
bytes in a sidecar file; anything that does not verify is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sts import __version__
from sts import extract as ex
from sts.data import Dataset, Example, warn
from sts.embedded import cache_root
from sts.errors import UserError, atomic_path
from sts.score import METHODS, ShiftSamples, check_k, shift_samples
from sts.score import score as score_domains

CACHE_FORMAT = 3  # bump when extraction semantics change (3: per-example shifts)


@dataclass
class PredictConfig:
    model: str
    sae: str
    train: str
    domains: str
    method: str = "icl"  # icl | sft | paper
    tuned_model: str | None = None
    k: int = 100
    demos: int = 2
    seed: int = 0
    max_train: int | None = 200
    max_examples: int | None = 100  # per domain
    max_tokens: int | None = None  # per domain
    max_length: int | None = 512
    batch_size: int = 8
    top_contexts: int = 5
    use_cache: bool = True
    skip_first: bool = True  # leave each domain question's first token (the attention sink) out


@dataclass
class FeatureReport:
    index: int
    shift: float
    contexts: list[dict[str, Any]] = field(default_factory=list)  # top activations in the data


@dataclass
class Prediction:
    config: dict[str, Any]
    hook: str
    scores: dict[str, float]  # domain -> STS
    tokens: dict[str, int]  # domain -> tokens scored
    questions: dict[str, int]
    train_tokens: int
    features: list[FeatureReport]
    samples: ShiftSamples | None = None  # for bootstrapping S (icl/sft shifts)

    def ranking(self) -> list[tuple[int, str, float, int]]:
        ordered = sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(i + 1, name, value, self.tokens[name]) for i, (name, value) in enumerate(ordered)]


# --- cache -------------------------------------------------------------------------------

def _hash_path(path: Path, h: Any) -> None:
    """Small files by content; large ones (model weights) by name, size and mtime."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        st = p.stat()
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        if st.st_size <= 64 << 20:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())


def fingerprint(spec: str) -> str:
    """Identity of a model or SAE spec: file contents/metadata for local paths, else the id."""
    if not spec:
        return ""
    h = hashlib.sha256(spec.encode())
    if Path(spec).exists():
        _hash_path(Path(spec), h)
    return h.hexdigest()


def _examples_hash(examples: list[Example]) -> str:
    return hashlib.sha256(json.dumps([asdict(e) for e in examples], sort_keys=True).encode()).hexdigest()


class Cache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root, self.enabled = root / "extract", enabled

    def get_or_compute(self, key: dict[str, Any], compute: Callable[[], ex.Stats]) -> ex.Stats:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        path = self.root / f"{digest}.safetensors"
        check = path.with_suffix(".sha256")
        if self.enabled and path.exists() and check.exists():
            try:
                if hashlib.sha256(path.read_bytes()).hexdigest() == check.read_text().strip():
                    stats = ex.Stats.load(path)
                    if stats.meta.get("cache_key") == digest:
                        return stats
            except (UserError, OSError, ValueError):
                pass
            warn(f"cache entry {path.name} is corrupted; recomputing it")
        stats = compute()
        if self.enabled:
            stats.meta = stats.meta | {"cache_key": digest}
            stats.save(path)
            check.write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
        return stats


# --- top-activating contexts ---------------------------------------------------------------

def top_contexts(engine: ex.Extractor, seqs: list[ex.Sequence], features: list[int], n: int,
                 tok: Any, window: int = 12) -> dict[int, list[dict[str, Any]]]:
    """For each feature, the n tokens (over the counted positions of `seqs`) where it fires
    most, with a few tokens of context on each side and the token itself in [[...]]."""
    heaps: dict[int, list[tuple[float, int, int]]] = {j: [] for j in features}
    cols = torch.tensor(features, dtype=torch.long)
    for start in range(0, len(seqs), engine.batch_size):
        batch = seqs[start:start + engine.batch_size]
        f = engine.features(batch)[:, cols]
        where = [(start + i, p) for i, s in enumerate(batch) for p in s.positions]
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

def predict(cfg: PredictConfig, train: Dataset, domains: dict[str, list[Example]],
            progress: Callable[[str], None] = lambda _m: None) -> Prediction:
    """Shift statistics of the training set, per-domain statistics, then STS per domain."""
    from sts.models import load_model, parse_hook_name
    from sts.saes import load_sae

    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; use {', '.join(METHODS)}")
    if cfg.method == "sft" and not cfg.tuned_model:
        raise UserError("--method sft needs --tuned-model (the fine-tuned model)")
    sae = load_sae(cfg.sae)
    point = parse_hook_name(sae.hook_name)
    for spec in filter(None, (cfg.model, cfg.tuned_model if cfg.method == "sft" else None)):
        ex.check_fits(sae, point, spec)
    check_k(cfg.k, sae.d_sae)
    empty = [name for name, exs in domains.items() if not exs]
    if empty:
        raise UserError(f"domain(s) {', '.join(empty)} have no questions; check --domains")

    cache = Cache(cache_root(), cfg.use_cache)
    base_key = {"v": CACHE_FORMAT, "code": __version__, "model": fingerprint(cfg.model),
                "sae": fingerprint(cfg.sae), "hook": point.name, "max_length": cfg.max_length}
    lm: Any = None

    def engine() -> ex.Extractor:
        nonlocal lm
        if lm is None:
            progress(f"loading {cfg.model}")
            lm = load_model(cfg.model)
        return ex.Extractor(lm, sae, point, cfg.batch_size)

    train_render = ex.Render(chat=cfg.method != "paper", with_response=True,
                             tokens="all" if cfg.method == "paper" else "response")
    train_key = base_key | {"kind": "shift", "method": cfg.method, "render": asdict(train_render),
                            "examples": _examples_hash(train.examples), "demos": cfg.demos,
                            "seed": cfg.seed, "tuned": fingerprint(cfg.tuned_model or "")}

    def compute_shift() -> ex.Stats:
        e = engine()
        progress(f"shift ({cfg.method}) on {len(train.examples)} training examples")
        tuned = None
        if cfg.method == "sft":
            tuned = ex.Extractor(load_model(cfg.tuned_model or ""), sae, point, cfg.batch_size)
        return ex.shift_stats(e, cfg.method, train.examples, train_render, cfg.demos, cfg.seed,
                              cfg.max_length, cfg.max_tokens if cfg.method == "paper" else None, tuned)

    shift_stats = cache.get_or_compute(train_key, compute_shift)
    if shift_stats.a.count == 0 or shift_stats.sum_sq_diff is None:
        raise UserError(f"no aligned tokens in the training set {train.spec}; check its data")

    domain_render = ex.Render(chat=False, with_response=False, tokens="all", skip_first=cfg.skip_first)
    mean_sq: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    for name, exs in domains.items():
        key = base_key | {"kind": "domain", "render": asdict(domain_render),
                          "examples": _examples_hash(exs), "max_tokens": cfg.max_tokens}

        def compute_domain(exs: list[Example] = exs, name: str = name) -> ex.Stats:
            e = engine()
            seqs = ex.sequences(exs, e.lm.tokenizer, domain_render, cfg.max_length)
            return ex.Stats(e.stats(seqs, len(exs), cfg.max_tokens, desc=f"domain {name}"))

        stats = cache.get_or_compute(key, compute_domain)
        if stats.a.count == 0:
            raise UserError(f"domain {name} is empty: no tokens were extracted; check its data")
        mean_sq[name], tokens[name] = stats.a.mean_sq, stats.a.count

    shift, scores = score_domains(shift_stats.sum_sq_diff, mean_sq, cfg.k)

    contexts: dict[int, list[dict[str, Any]]] = {}
    if cfg.top_contexts > 0:
        ctx_key = base_key | {"kind": "contexts", "features": shift.features, "n": cfg.top_contexts,
                              "examples": _examples_hash(train.examples), "render": asdict(train_render)}
        contexts = _cached_json(cache, ctx_key, lambda: _contexts(engine(), train.examples,
                                                                   train_render, shift.features, cfg))
    features = [FeatureReport(j, float(shift.values[j]), contexts.get(j, contexts.get(str(j), [])))
                for j in shift.features]
    return Prediction(config=asdict(cfg), hook=point.name, scores=scores, tokens=tokens,
                      questions={n: len(e) for n, e in domains.items()},
                      train_tokens=shift_stats.a.count, features=features,
                      samples=shift_samples(shift_stats, mean_sq, shift, cfg.k))


def _contexts(engine: ex.Extractor, examples: list[Example], render: ex.Render, features: list[int],
              cfg: PredictConfig) -> dict[int, list[dict[str, Any]]]:
    tok = engine.lm.tokenizer
    seqs = list(ex.sequences(examples, tok, render, cfg.max_length))
    return top_contexts(engine, seqs, features, cfg.top_contexts, tok)


def _cached_json(cache: Cache, key: dict[str, Any], compute: Callable[[], dict[int, Any]]) -> dict[Any, Any]:
    """Small JSON results share the extraction cache's key and integrity rules."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = cache.root / f"{digest}.json"
    if cache.enabled and path.exists():
        try:
            payload = json.loads(path.read_text())
            body = json.dumps(payload["data"], sort_keys=True)
            if payload["key"] == digest and payload["sha256"] == hashlib.sha256(body.encode()).hexdigest():
                return {int(k): v for k, v in payload["data"].items()}
        except (ValueError, KeyError, TypeError):
            pass
        warn(f"cache entry {path.name} is corrupted; recomputing it")
    data = compute()
    if cache.enabled:
        body = json.dumps({str(k): v for k, v in data.items()}, sort_keys=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"key": digest, "sha256": hashlib.sha256(body.encode()).hexdigest(),
                                       "data": json.loads(body)}))
    return data
