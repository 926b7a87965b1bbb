"""Per-feature numbers of statistics that the registered scores are built from (`sts.scores.score`):
a domain's mean f, mean f^2 and ICL change, a shift's share of each feature's energy, a domain's
usage relative to the others, and the reduction over S. Pure functions of tensors and statistics;
torch is imported where they run, so that the registry that names them loads without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sts.choices import Readout

if TYPE_CHECKING:
    import torch

    from sts.engine.stats import FeatureStats, PairedStats


def mean_activation(st: FeatureStats) -> torch.Tensor:
    """mean f over the counted tokens."""
    return st.sum / st.count



def mean_square(st: FeatureStats) -> torch.Tensor:
    """mean f^2 over the counted tokens."""
    return st.sum_sq / st.count



def icl_change(st: PairedStats) -> torch.Tensor:
    """mean (f(demos_D, x) - f(x))^2 over the aligned question tokens."""
    return st.sum_sq_diff / st.a.count



EPS_SHARE = 1e-3  # eps of the relative shift, as a share of the mean per-feature base energy



def domain_score(values: torch.Tensor, features: list[int], reduce: str = "mean") -> float:
    """A score over S from one per-feature number of the domain (mean f^2 for `sq`, mean f for
    `act`, mean squared ICL change for `icl`): the mean or the sum over S."""
    import torch

    picked = values[torch.tensor(features, dtype=torch.long)]
    return float(picked.sum() if reduce == "sum" else picked.mean())



def energy_scale(stats: PairedStats) -> torch.Tensor:
    """[d_sae] float64: sum over the aligned tokens of f_a^2 + f_b^2, plus eps = EPS_SHARE x the
    mean over features of sum f_a^2 (so that a feature firing on a token or two, whose share of
    changed energy is near 1 by chance, does not top the relative shift)."""
    eps = EPS_SHARE * float(stats.a.sum_sq.double().mean())
    return stats.a.sum_sq.double() + stats.b.sum_sq.double() + (eps if eps > 0 else 1.0)



def relative_shift(stats: PairedStats, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The share of each feature's own energy that the shift changes: sum (f_b - f_a)^2 /
    energy_scale (in [0, 1] for non-negative features); `scale`: energy_scale, if computed."""
    return stats.sum_sq_diff.double() / (energy_scale(stats) if scale is None else scale)



def relative_usage(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each domain's per-feature value over its mean across the given domains (0 where that
    mean is 0): how much more than the average domain a domain uses a feature, whatever the
    feature's scale."""
    import torch

    mean = torch.stack([v.double() for v in values.values()]).mean(0)
    nonzero = mean != 0
    safe = torch.where(nonzero, mean, torch.ones_like(mean))
    return {d: torch.where(nonzero, v.double() / safe, torch.zeros_like(mean)) for d, v in values.items()}



def effective_k(k: int, width: int, readout: Readout | None) -> int:
    """The k a score uses: on SAE features k must fit the width (else a bad --k); the raw
    baselines take min(k, hidden size), so one --k serves both readouts."""
    from sts.scores.selection import check_k

    if readout is Readout.RAW:
        return min(k, width)
    check_k(k, width)
    return k
