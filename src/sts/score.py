"""Scoring: shifted features S and STS per domain (formulas in shared/DESIGN.md).

    shift_j = sum_t (shifted[t, j] - base[t, j])^2
    S       = the k features with the largest shift, largest first
    STS(D)  = mean_{j in S} mean_{t in tokens(D)} f_j(x_t)^2

The same formulas serve the reference's dense `.pt` tensors (method `paper`, rows aligned by
index, first N rows) and our streamed statistics files (where the sums were accumulated
during extraction over aligned tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sts.errors import UserError
from sts.extract import Stats

METHODS = ("icl", "sft", "paper")
_CHUNK = 1024  # rows at a time, so dense scoring holds O(chunk x d_sae) beyond the mmap


@dataclass
class Shift:
    """Per-feature shift and the top-k shifted features."""

    values: torch.Tensor  # [d_sae] float64
    features: list[int]  # indices, largest shift first

    @property
    def d_sae(self) -> int:
        return self.values.shape[0]


def check_k(k: int, d_sae: int) -> None:
    if not 1 <= k <= d_sae:
        raise UserError(f"k must be between 1 and the SAE width {d_sae} (got {k}); change --k")


def top_features(shift: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest shifts, descending; ties broken by the lower index."""
    check_k(k, shift.shape[0])
    # A stable descending sort gives a deterministic order among equal shifts.
    order = torch.sort(shift, descending=True, stable=True).indices
    return order[:k].tolist()


def domain_score(mean_sq: torch.Tensor, features: list[int]) -> float:
    """STS(D) from the per-feature mean of f^2 over the domain's tokens."""
    return float(mean_sq[torch.tensor(features, dtype=torch.long)].mean())


# --- reference dense tensors -----------------------------------------------------------

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
        raise UserError(f"{path}: the tensor has no rows (no tokens); re-extract it")
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


def dense_mean_sq(domain: torch.Tensor, n: int = 10_000) -> torch.Tensor:
    """mean_{t < n} D[t, j]^2 per feature."""
    rows = min(n, domain.shape[0])
    out = torch.zeros(domain.shape[1], dtype=torch.float64)
    for i in range(0, rows, _CHUNK):
        out += (domain[i:min(i + _CHUNK, rows)].double() ** 2).sum(0)
    return out / rows


# --- statistics files ------------------------------------------------------------------

def stats_shift(stats: Stats, source: str) -> torch.Tensor:
    if stats.sum_sq_diff is None:
        raise UserError(f"{source} holds one run's statistics, not a shift; extract it with "
                        "`sts extract --shift icl|sft|paper`")
    if stats.a.count == 0:
        raise UserError(f"{source}: no aligned tokens were extracted; check the training data")
    return stats.sum_sq_diff


def stats_mean_sq(stats: Stats, source: str) -> torch.Tensor:
    if stats.a.count == 0:
        raise UserError(f"domain {source} is empty: no tokens were extracted; check its data")
    return stats.a.mean_sq


# --- the whole scoring step --------------------------------------------------------------

def is_dense(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".pt", ".pth")


def domain_mean_sq(path: str | Path, max_tokens: int) -> torch.Tensor:
    if is_dense(path):
        return dense_mean_sq(load_dense(path), max_tokens)
    if not Path(path).is_file():
        raise UserError(f"domain file not found: {path}")
    return stats_mean_sq(Stats.load(path), str(path))


def score(shift: torch.Tensor, domains: dict[str, torch.Tensor], k: int) -> tuple[Shift, dict[str, float]]:
    """Top-k shifted features, then STS for each domain's per-feature mean f^2."""
    for name, mean_sq in domains.items():
        if mean_sq.shape[0] != shift.shape[0]:
            raise UserError(f"domain {name!r} has {mean_sq.shape[0]} features but the shift has "
                            f"{shift.shape[0]}; all files must come from the same SAE")
    features = top_features(shift, k)
    return Shift(shift, features), {name: domain_score(m, features) for name, m in domains.items()}


# --- the shifted-feature estimate, resampled ---------------------------------------------------

@dataclass
class ShiftSamples:
    """What it takes to recompute STS on a bootstrap resample of the training examples: each
    example's shift on the candidate features (the top C by total shift; a resample's top k
    comes from these), and each domain's mean f^2 on them. Lets `sts correlate` put the
    uncertainty of S (which features moved) into its interval, not only that of accuracy."""

    features: list[int]  # candidate feature indices, largest total shift first
    example_shift: torch.Tensor  # [examples, C] float64
    domain_mean_sq: dict[str, torch.Tensor]  # domain -> [C] float64
    k: int

    def scores(self, rows: torch.Tensor | None = None) -> dict[str, float]:
        """STS per domain from the examples `rows` (with repeats); all examples if None."""
        shift = (self.example_shift if rows is None else self.example_shift[rows]).sum(0)
        top = torch.sort(shift, descending=True, stable=True).indices[: self.k]
        return {d: float(m[top].mean()) for d, m in self.domain_mean_sq.items()}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from sts.errors import atomic_path

        names = list(self.domain_mean_sq)
        tensors = {"features": torch.tensor(self.features, dtype=torch.long),
                   "example_shift": self.example_shift.float().contiguous(),
                   "domain_mean_sq": torch.stack([self.domain_mean_sq[n] for n in names]).float()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "sts-shift-samples/1",
                                                   "domains": json.dumps(names), "k": str(self.k)})

    @classmethod
    def load(cls, path: Path) -> ShiftSamples:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                t = {name: fh.get_tensor(name) for name in fh.keys()}
            names = json.loads(meta["domains"])
            return cls(t["features"].tolist(), t["example_shift"].double(),
                       {n: t["domain_mean_sq"][i].double() for i, n in enumerate(names)}, int(meta["k"]))
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise UserError(f"{path}: not a readable shift-samples file ({exc})") from None


def shift_samples(stats: Stats, mean_sq: dict[str, torch.Tensor], shift: Shift, k: int
                  ) -> ShiftSamples | None:
    """Candidates: the top max(10k, 1000) features by total shift (capped at the width)."""
    if stats.per_example is None:
        return None
    n = min(shift.d_sae, max(10 * k, 1000))
    candidates = top_features(shift.values, n)
    cols = torch.tensor(candidates, dtype=torch.long)
    return ShiftSamples(candidates, stats.example_shift(candidates),
                        {d: m.double()[cols] for d, m in mean_sq.items()}, k)
