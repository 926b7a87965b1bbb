"""`sts score`: scores from files, without a model: paired statistics files of `sts extract`, the
reference's dense `.pt` tensors (method `paper`, rows aligned by index, first N rows), or texts for
the lexical score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sts.choices import Method, parse
from sts.engine.stats import FeatureStats, PairedStats, Stats, load_stats
from sts.errors import UserError, no_tokens
from sts.scores.baselines import domain_text, lexical_scores, training_text
from sts.scores.score import (
    COSINE,
    LEXICAL,
    feature_scores,
    feature_values,
    score,
    score_stats,
    scored_values,
    spec_of,
)
from sts.scores.settings import ScoreConfig, is_dense

_CHUNK = 1024  # rows at a time, so dense scoring holds O(chunk x d_sae) beyond the mmap


def load_dense(path: str | Path) -> torch.Tensor:
    """A `[tokens, d_sae]` tensor as the reference saves it (memory-mapped, not read whole)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"feature file not found: {path}")
    try:
        t = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # an old-format (non-zip) file cannot be memory-mapped
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{path}: not a readable torch tensor file ({type(exc).__name__})") from None
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise UserError(f"{path}: expected a 2-D [tokens, d_sae] tensor, found {shape}")
    if t.shape[0] == 0:
        raise no_tokens(f"{path} (the tensor has no rows)", "re-extract it")
    return t


def dense_shift(base: torch.Tensor, shifted: torch.Tensor, n: int = 10_000) -> torch.Tensor:
    """shift_j = sum_{t < n} (shifted[t, j] - base[t, j])^2, rows aligned by index (over the
    rows both tensors have)."""
    if base.shape[1] != shifted.shape[1]:
        raise UserError(f"base and shifted features have different widths ({base.shape[1]} vs "
                        f"{shifted.shape[1]}); they must come from the same SAE")
    rows = min(n, base.shape[0], shifted.shape[0])
    out = torch.zeros(base.shape[1], dtype=torch.float64)
    for i in range(0, rows, _CHUNK):
        j = min(i + _CHUNK, rows)
        out += ((shifted[i:j].double() - base[i:j].double()) ** 2).sum(0)
    return out


def dense_mean_sq(domain: torch.Tensor, n: int = 10_000, power: int = 2) -> torch.Tensor:
    """mean_{t < n} D[t, j]^power per feature (power 2: the notebook's mean f^2; 1: mean f)."""
    rows = min(n, domain.shape[0])
    out = torch.zeros(domain.shape[1], dtype=torch.float64)
    for i in range(0, rows, _CHUNK):
        out += (domain[i:min(i + _CHUNK, rows)].double() ** power).sum(0)
    return out / rows


def stats_shift(stats: Stats, source: str) -> torch.Tensor:
    if not isinstance(stats, PairedStats):
        raise UserError(f"{source} holds one run's statistics, not a shift; extract it with "
                        "`sts extract --shift icl|sft|paper`")
    if stats.a.count == 0:
        raise UserError(f"{source}: no aligned tokens were extracted; check the training data")
    return stats.sum_sq_diff


def domain_values(name: str, path: str | Path, max_tokens: int) -> torch.Tensor:
    """The per-feature values a score reduces over S, from a dense `.pt` tensor (act, sq) or a
    statistics file (act, sq, icl, and raw-act / raw-sq on raw-readout statistics)."""
    power = spec_of(name).dense_power
    if is_dense(path):
        if power is None:
            raise UserError(f"{path}: a dense tensor holds one run's features; the {name} score "
                            "needs statistics files (`sts extract`)")
        return dense_mean_sq(load_dense(path), max_tokens, power=power)
    if not Path(path).is_file():
        raise UserError(f"domain file not found: {path}")
    stats = load_stats(path)
    check_readout(stats, name, str(path))
    return feature_values(name, stats.a, stats if isinstance(stats, PairedStats) else None, str(path))


def check_readout(stats: Stats, name: str, source: str) -> None:
    """A raw-* score needs raw-residual statistics; an SAE score needs SAE statistics."""
    have, want = stats.meta.get("readout", "sae"), spec_of(name).readout
    if want is not None and have != want:
        raise UserError(f"{source} holds {have} statistics but the {name} score needs {want} "
                        f"statistics (`sts extract --readout {want}`)")


@dataclass
class ScoreResult:
    """What `sts score` writes (its JSON keys)."""

    score: str
    formula: str
    method: str | None
    k: int
    shifted_features: list[int]
    scores: dict[str, float]


def run(cfg: ScoreConfig) -> ScoreResult:
    """Score every domain and write cfg.out (JSON, atomically)."""
    from dataclasses import asdict

    from sts.files import atomic_path

    spec = spec_of(cfg.score)
    features: list[int] = []
    method = cfg.method
    if spec.kind is LEXICAL:
        from sts.data.datasets import load_dataset

        assert cfg.train is not None
        scores = lexical_scores(training_text(load_dataset(cfg.train).examples),
                                {n: domain_text(load_dataset(path).examples) for n, path in cfg.domains.items()})
    elif cfg.shift_stats is not None:
        stats = load_stats(cfg.shift_stats)
        stats_shift(stats, str(cfg.shift_stats))  # paired, with aligned tokens
        assert isinstance(stats, PairedStats)
        check_readout(stats, cfg.score, str(cfg.shift_stats))
        file_method = parse(Method, stats.meta.get("shift", "icl"), "shift in the statistics file")
        if method is not None and method != file_method:
            raise UserError(f"{cfg.shift_stats} holds a '{file_method}' shift but --method {method} was asked")
        method = file_method
        if spec.kind is COSINE:
            scores = score_stats(cfg.score, stats, _single_stats(cfg.domains, cfg.score), {}, cfg.k).scores
        else:
            values = {name: domain_values(cfg.score, path, cfg.max_tokens) for name, path in cfg.domains.items()}
            result, scores, _ = feature_scores(cfg.score, stats, scored_values(cfg.score, values), cfg.k)
            features = result.features
    else:
        assert cfg.base is not None and cfg.shifted is not None
        method = Method.PAPER
        shift = dense_shift(load_dense(cfg.base), load_dense(cfg.shifted), cfg.max_tokens)
        values = {name: domain_values(cfg.score, path, cfg.max_tokens) for name, path in cfg.domains.items()}
        result, scores = score(shift, values, cfg.k, spec.reduce)
        features = result.features
    out = ScoreResult(str(cfg.score), spec.formula, None if method is None else method.value, cfg.k,
                      features, scores)
    with atomic_path(cfg.out) as tmp:
        tmp.write_text(json.dumps(asdict(out), indent=2) + "\n")
    return out


def _single_stats(domains: dict[str, str], name: str) -> dict[str, FeatureStats]:
    """Each domain's single-run statistics file, checked for the score's readout."""
    out = {}
    for domain, path in domains.items():
        if is_dense(path) or not Path(path).is_file():
            raise UserError(f"--score {name} needs a statistics file per domain (got {path})")
        stats = load_stats(path)
        check_readout(stats, name, path)
        out[domain] = stats.a
    return out
