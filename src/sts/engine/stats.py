"""Per-feature sufficient statistics and their file format (`sts extract`'s output).

Both the shift and the domain score are sums over tokens, so a run is summarised by
(count, sum f, sum f^2, firing count) per feature, and a paired run adds sum (f_b - f_a)^2 over
aligned tokens and, per training example, its own share of it (for the bootstrap over
examples). A file is safetensors with the provenance as JSON in its metadata header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sts.errors import UserError
from sts.files import atomic_path


@dataclass
class FeatureStats:
    """Per-feature sufficient statistics over the counted tokens of one run."""

    count: int
    sum: torch.Tensor  # [d_sae] float64
    sum_sq: torch.Tensor  # [d_sae] float64
    fires: torch.Tensor  # [d_sae] int64: tokens where f != 0 (f > 0 for ReLU-family SAEs)

    @classmethod
    def zeros(cls, d_sae: int, device: torch.device | str = "cpu") -> FeatureStats:
        """Empty statistics on `device`: where the features come out, so that they are
        accumulated there and copied to the host once per run (`cpu`), not once per batch."""
        return cls(0, torch.zeros(d_sae, dtype=torch.float64, device=device),
                   torch.zeros(d_sae, dtype=torch.float64, device=device),
                   torch.zeros(d_sae, dtype=torch.int64, device=device))

    def update(self, f: torch.Tensor) -> None:
        """Add a block of [tokens, d_sae] features. SAE features are sparse (TopK/JumpReLU
        keep tens of a few thousand), so we accumulate over the nonzero entries only:
        about 8x faster than dense float64 reductions on CPU, and exact in float64."""
        self.count += f.shape[0]
        f = f.to(self.sum.device)
        rows, cols = f.nonzero(as_tuple=True)
        values = f[rows, cols].double()
        self.sum.index_add_(0, cols, values)
        self.sum_sq.index_add_(0, cols, values * values)
        self.fires += torch.bincount(cols, minlength=self.d_sae)

    @property
    def d_sae(self) -> int:
        return self.sum.shape[0]

    def cpu(self) -> FeatureStats:
        return FeatureStats(self.count, self.sum.cpu(), self.sum_sq.cpu(), self.fires.cpu())


@dataclass
class ExampleShifts:
    """Each training example's own sum over its aligned tokens of (f_b - f_a)^2, sparse
    (example index, feature, value), sorted by (example, feature). Lets `sts correlate`
    bootstrap the shifted-feature estimate by resampling training examples; the per-example
    sums add up to the paired run's `sum_sq_diff`."""

    rows: torch.Tensor  # [entries] int
    cols: torch.Tensor  # [entries] int
    values: torch.Tensor  # [entries] float
    examples: int  # examples behind the entries (trailing ones may have none)

    def on(self, features: list[int], d_sae: int) -> torch.Tensor:
        """[examples, len(features)] float64: each example's shift on the given features."""
        n = max(int(self.rows.max()) + 1 if self.rows.numel() else 0, self.examples)
        where = torch.full((d_sae,), -1, dtype=torch.long)
        where[torch.tensor(features, dtype=torch.long)] = torch.arange(len(features))
        keep = where[self.cols.long()] >= 0
        out = torch.zeros(n, len(features), dtype=torch.float64)
        out.index_put_((self.rows.long()[keep], where[self.cols.long()[keep]]), self.values[keep].double(),
                       accumulate=True)
        return out


@dataclass
class RunStats:
    """One run's statistics: a dataset's tokens read once (a domain, or `sts extract`
    without --shift). `a` names the run as it names the base side of a pair."""

    a: FeatureStats
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        _save(_tensors(self.a), self.meta, path)


@dataclass
class PairedStats:
    """A paired run: base side `a`, shifted side `b` on aligned tokens, and
    sum over those tokens of (f_b - f_a)^2 per feature (the shift)."""

    a: FeatureStats
    b: FeatureStats
    sum_sq_diff: torch.Tensor  # [d_sae] float64
    meta: dict[str, Any] = field(default_factory=dict)
    per_example: ExampleShifts | None = None  # runs over training examples (icl, sft)

    def example_shift(self, features: list[int]) -> torch.Tensor:
        """[examples, len(features)] float64: each example's shift on the given features."""
        if self.per_example is None:
            raise ValueError("these statistics carry no per-example shifts")
        return self.per_example.on(features, self.a.d_sae)

    def save(self, path: str | Path) -> None:
        tensors = _tensors(self.a) | _tensors(self.b, "b.") | {"sum_sq_diff": self.sum_sq_diff}
        if self.per_example is not None:
            e = self.per_example
            tensors |= {"example.row": e.rows, "example.col": e.cols, "example.value": e.values,
                        "example.count": torch.tensor([e.examples])}
        _save(tensors, self.meta, path)


Stats = RunStats | PairedStats
FORMAT = "sts-stats/1"  # one file format for both kinds: a paired file has the b.* entries


def _tensors(f: FeatureStats, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}count": torch.tensor([f.count]), f"{prefix}sum": f.sum, f"{prefix}sum_sq": f.sum_sq,
            f"{prefix}fires": f.fires}


def _feature_stats(t: dict[str, torch.Tensor], prefix: str = "") -> FeatureStats:
    return FeatureStats(int(t[f"{prefix}count"][0]), t[f"{prefix}sum"], t[f"{prefix}sum_sq"], t[f"{prefix}fires"])


def _save(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> None:
    """safetensors with the statistics, and JSON provenance in its metadata header."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "sts": json.dumps(meta)})


def load_stats(path: str | Path) -> Stats:
    """Read a statistics file: `PairedStats` where it holds a paired run, `RunStats` otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            header = fh.metadata() or {}
        t = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise UserError(f"{path}: not a readable sts statistics file ({exc})") from None
    if header.get("format") != FORMAT:
        raise UserError(f"{path}: not an sts statistics file (write one with `sts extract`)")
    meta = json.loads(header.get("sts", "{}"))
    if "b.sum" not in t:
        return RunStats(_feature_stats(t), meta)
    per_example = None
    if "example.row" in t:
        count = int(t["example.count"][0]) if "example.count" in t else 0
        per_example = ExampleShifts(t["example.row"], t["example.col"], t["example.value"], count)
    return PairedStats(_feature_stats(t), _feature_stats(t, "b."), t["sum_sq_diff"], meta, per_example)
