"""The one rule for comparing floats that two computations of one quantity reach by different roads:
another batching, another number of processes, another thread count, another device.

The roads sum the same terms in another order (a matmul blocks its dot products by the thread count
and the batch's shape; a process group adds its shares at the end). A float sum of n terms lies
within gamma_n * sum |x_i| of the exact sum, with gamma_n = n u / (1 - n u) ~ n u and u = eps / 2
the dtype's unit roundoff (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 4.2),
so two orders of the same sum lie within 2 n u sum |x_i| = n eps sum |x_i| of each other. A quantity
computed through a chain of reductions (a forward pass's dot products layer by layer, then a sum over
tokens) carries, to first order, the sum of their lengths. Hence, for a chain of `length`:

    |got - want| <= length * eps(dtype) * (|want| + scale)

`scale` stands for sum |x_i| where the terms carry signs or pass through a threshold (an SAE
activation just above its threshold carries the error of its pre-activation, not of its own small
value): by default the largest |want| compared, the quantity's own scale. A real bug (a pad token
counted, an example read twice, a share dropped) moves a statistic by far more than this.
"""

from __future__ import annotations

import torch

from tests.conftest import HIDDEN, INTERMEDIATE, N_LAYERS

# The longest sequence a test here feeds the tiny models (prompt, demonstrations and response).
LONGEST = 256
# One forward pass of the tiny models up to the SAE's features, as a chain of reductions: per layer
# the q, k, v and output projections (HIDDEN each), the attention's scores and weighted sum (at most
# LONGEST each) and the MLP's two matmuls (HIDDEN, INTERMEDIATE); then the SAE's encoder (HIDDEN).
TINY_FORWARD = N_LAYERS * (4 * HIDDEN + 2 * LONGEST + HIDDEN + INTERMEDIATE) + HIDDEN


def tolerance(length: int, dtype: torch.dtype = torch.float32) -> float:
    """The relative bound between two orders of a chain of reductions of `length` in `dtype`."""
    return length * torch.finfo(dtype).eps


def assert_same_reduction(got: torch.Tensor | float, want: torch.Tensor | float, *, length: int,
                          dtype: torch.dtype = torch.float32, scale: float | None = None) -> None:
    """`got` and `want` are one quantity reached by two orders of the same reductions: equal within
    the arithmetic's bound (module docstring). `length`: the chain's length, e.g. TINY_FORWARD plus
    the number of tokens summed."""
    got_t, want_t = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    tol = tolerance(length, dtype)
    if scale is None:
        scale = float(want_t.abs().max()) if want_t.numel() else 0.0
    torch.testing.assert_close(got_t, want_t, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"beyond the arithmetic's bound (length {length}, {dtype}): {m}")
