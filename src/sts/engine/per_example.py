"""Per-example gradients of a LoRA adapter from one backward pass over a batch of examples.

`grad-adam` needs each training example's own gradient (v is the mean of their squares), so the
training side took one backward pass per example: on a GPU a batch of one leaves the device idle.
(On 2 CPU cores batching gains nothing: a bare batched pass reads 130-132 tokens/s, as one example
at a time does, so there `gradients.TRAIN_BATCH_TOKENS` keeps one example a pass; these hooks
then cost 2%: docs/results/speed.md.) Every
trainable parameter of the adapter is the weight of an `nn.Linear` (peft's lora_A / lora_B, no
bias), and a linear layer's weight gradient is a sum over tokens of (gradient at its output) x
(its input): keeping both per example (a forward hook on the input, a tensor hook on the output's
gradient) gives each example's gradient exactly from a batched pass, the way Opacus computes
per-sample gradients (its `GradSampleModule` hooks do the same for `nn.Linear`). Written here
rather than taken from Opacus: that package is a training wrapper with its own optimizer and
privacy accounting, and this needs only the one rule.

It is exact when the batch's loss is a sum of per-example terms that share nothing: padding is
masked (attention and loss), and the model runs in eval mode (no dropout draws across the batch).
"""

from __future__ import annotations

from typing import Any

import torch


class PerExampleGrads:
    """Hooks on every linear layer whose weight is trainable; after one backward pass of a batch
    loss that sums per-example terms, `flat()` is [batch, parameters]: each example's gradient, in
    the order of `params` (`[p for p in model.parameters() if p.requires_grad]`)."""

    def __init__(self, model: Any, params: list[torch.nn.Parameter]):
        self.params = params
        owners = {id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Linear)}
        missing = [i for i, p in enumerate(params) if id(p) not in owners]
        if missing or any(m.bias is not None and m.bias.requires_grad for m in owners.values()):
            raise ValueError("per-example gradients need every trainable parameter to be a linear layer's "
                             "weight without a trainable bias (a LoRA adapter)")
        self.modules = [owners[id(p)] for p in params]
        self.inputs: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._forward(i)) for i, m in enumerate(self.modules)]

    def _forward(self, i: int) -> Any:
        def hook(module: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.inputs[i] = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda g: self.grads.__setitem__(i, g.detach()))
        return hook

    def flat(self) -> torch.Tensor:
        """[batch, parameters] float32 on the CPU: sum over tokens of grad_out (x) input, per example."""
        parts = []
        for i, p in enumerate(self.params):
            x, g = self.inputs.get(i), self.grads.get(i)
            if x is None or g is None:  # the layer did not take part: no gradient
                batch = next(iter(self.inputs.values())).shape[0]
                parts.append(torch.zeros(batch, p.numel()))
                continue
            x, g = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
            parts.append(torch.einsum("bto,bti->boi", g.float(), x.float()).reshape(x.shape[0], -1).cpu())
        self.inputs.clear()
        self.grads.clear()
        return torch.cat(parts, dim=1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
