"""The one rule for comparing floats that two computations of one quantity reach by different roads:
another batching, another number of processes, another thread count, another device or machine.

The roads sum the same terms in another order (a matmul blocks its dot products by the thread count
and the batch's shape; a process group adds its shares at the end). A float sum of n terms carries
an error of at most about n u sum |x_i| (u = eps / 2, the dtype's unit roundoff; Higham, *Accuracy
and Stability of Numerical Algorithms*, 2nd ed., 4.2), and with rounding errors that behave as
independent, mean-zero ones, at most lambda sqrt(n) u sum |x_i| except with probability below
2n exp(-lambda^2 / 2) (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019). We take the probabilistic
bound with lambda = 7 (failure odds below 1e-9 for any chain here): two roads then lie within
lambda sqrt(n) eps sum |x_i| of each other. A quantity computed through a chain of reductions (a
forward pass's dot products layer by layer, then a sum over tokens) carries, to first order, the sum
of their lengths. Hence, for a chain of `length`:

    |got - want| <= 7 sqrt(length) eps(dtype) (|want| + scale)

`scale` stands for sum |x_i| where the terms carry signs or pass through a threshold (an SAE
activation just above its threshold carries the error of its pre-activation, not of its own small
value): by default the largest |want| compared, the quantity's own scale. A real bug (a pad token
counted, an example read twice, a share dropped) moves a statistic by far more than this.
"""

from __future__ import annotations

import math

import torch

from tests.conftest import HIDDEN, INTERMEDIATE, N_LAYERS

LAMBDA = 7.0


def forward_length(layers: int, hidden: int, intermediate: int, tokens: int) -> int:
    """The chain of reductions of one forward pass of a decoder up to a residual SAE's features (as
    TINY_FORWARD, for a real model's shape and a sequence of `tokens`)."""
    return layers * (5 * hidden + 2 * tokens + intermediate) + hidden


# The longest sequence a test here feeds the tiny models (prompt, demonstrations and response).
LONGEST = 256
# One forward pass of the tiny models up to the SAE's features, as a chain of reductions: per layer
# the q, k, v and output projections and the MLP's first matmul (HIDDEN each), the attention's scores
# and weighted sum (at most LONGEST each) and the MLP's second (INTERMEDIATE); then the SAE's encoder.
TINY_FORWARD = forward_length(N_LAYERS, HIDDEN, INTERMEDIATE, LONGEST)
# A gradient score's inner product on the tiny models: at most every LoRA parameter (rank 16 on the
# seven linear layers of each block, each of at most HIDDEN + INTERMEDIATE inputs and outputs).
TINY_LORA = N_LAYERS * 7 * 16 * (HIDDEN + INTERMEDIATE)


def tolerance(length: int, dtype: torch.dtype = torch.float32) -> float:
    """The relative bound between two orders of a chain of reductions of `length` in `dtype`."""
    return LAMBDA * math.sqrt(length) * torch.finfo(dtype).eps


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
