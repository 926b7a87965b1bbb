"""S, the shifted features a score reads: the top k of a shift (`top_features`), and the
per-example shifts that let `sts correlate` resample S with the training examples (`ShiftSamples`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sts.engine.stats import PairedStats
from sts.errors import UserError


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


@dataclass
class ShiftSamples:
    """What it takes to recompute STS on a bootstrap resample of the training examples: each
    example's shift on the candidate features (the top C by total shift; a resample's top k
    comes from these), and each domain's mean f^2 on them. Lets `sts correlate` put the
    uncertainty of S (which features moved) into its interval, not only that of accuracy."""

    features: list[int]  # candidate feature indices, largest total shift first
    example_shift: torch.Tensor  # [examples, C] float64
    domain_values: dict[str, torch.Tensor]  # domain -> [C] float64 (what the score reduces)
    k: int
    reduce: str = "mean"  # over S: mean (sq) or sum (act, icl)
    # [C] float64: rel-* scores divide each resample's shift by the full set's energy_scale (kept
    # fixed, not resampled: the per-example energies are not stored); None: the shift as summed
    scale: torch.Tensor | None = None

    def scores(self, rows: torch.Tensor | None = None) -> dict[str, float]:
        """STS per domain from the examples `rows` (with repeats); all examples if None."""
        shift = (self.example_shift if rows is None else self.example_shift[rows]).sum(0)
        if self.scale is not None:
            shift = shift / self.scale
        top = torch.sort(shift, descending=True, stable=True).indices[: self.k]
        return {d: float(m[top].sum() if self.reduce == "sum" else m[top].mean())
                for d, m in self.domain_values.items()}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from sts.files import atomic_path

        names = list(self.domain_values)
        tensors = {"features": torch.tensor(self.features, dtype=torch.long),
                   "example_shift": self.example_shift.float().contiguous(),
                   "domain_values": torch.stack([self.domain_values[n] for n in names]).float()}
        if self.scale is not None:
            tensors["scale"] = self.scale.double().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "sts-shift-samples/2", "reduce": self.reduce,
                                                   "domains": json.dumps(names), "k": str(self.k)})

    @classmethod
    def load(cls, path: Path) -> ShiftSamples:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                t = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
            names = json.loads(meta["domains"])
            values = t["domain_values"] if "domain_values" in t else t["domain_mean_sq"]  # format 1
            return cls(t["features"].tolist(), t["example_shift"].double(),
                       {n: values[i].double() for i, n in enumerate(names)}, int(meta["k"]),
                       meta.get("reduce", "mean"), t["scale"].double() if "scale" in t else None)
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise UserError(f"{path}: not a readable shift-samples file ({exc})") from None


def shift_samples(stats: PairedStats, values: dict[str, torch.Tensor], shift: Shift, k: int,
                  reduce: str = "mean", scale: torch.Tensor | None = None) -> ShiftSamples | None:
    """Candidates: the top max(10k, 1000) features by the shift S is chosen by (capped at the
    width); `scale`: the rel-* scores' energy_scale, which divides the summed per-example shifts."""
    if stats.per_example is None:
        return None
    n = min(shift.d_sae, max(10 * k, 1000))
    candidates = top_features(shift.values, n)
    cols = torch.tensor(candidates, dtype=torch.long)
    return ShiftSamples(candidates, stats.example_shift(candidates),
                        {d: m.double()[cols] for d, m in values.items()}, k, reduce,
                        None if scale is None else scale.double()[cols])
