"""Scores that look past the first step (`line`, `look`, `look-fo`; `grad-sign` is in `sts.engine.gradients`).

`grad` is the first-order change of each domain's loss under one SGD step. `sts finetune` runs
AdamW, which moves each coordinate by about its learning rate whatever the gradient's size
(`gradients.first_update`), for 60 steps, not one; where a training set moves every domain a
little (MATH-500, physics chains of thought) the first-order term of one step ranks the domains
poorly (docs/results/heldout). These scores read more of the run, on the domain records
themselves (forward passes, no second backward):

    line     L_D(theta0) - L_D(theta0 - s_k u): the loss where a run that kept Adam's first update
             u would be after k steps (s_k: the recipe's learning rates summed over its first k)
    look     L_D(theta0) - L_D(theta_k): theta_k the adapter after k optimizer steps of
             `sts finetune`'s own trainer (its seed, batches, dropout and schedule), stopped there
    look-fo  <g_D, theta0 - theta_k>: the same displacement against each domain's gradient side,
             first order: the form that runs on the shipped, sealed domains, whose texts do not ship

L_D is the ground truth's loss (`gradients.domain_losses`: cot_nll on reference chains of
thought), theta0 the adapter as the seed initialises it (B = 0). Why the trainer itself and not a
loop written here: the lookahead must take the very steps the run takes (TRL's batching and
completion-only loss, transformers' AdamW, clipping and schedule); tests/test_lookahead.py checks
that `lookahead` equals `sts finetune` stopped at the same step.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sts.data.examples import Example
from sts.engine.finetuning import build_trainer, sft_args, trained_records
from sts.engine.gradients import DOMAIN_BATCH_TOKENS, adapted, domain_losses, first_update
from sts.engine.models import LoadedModel
from sts.engine.settings import FinetuneSpec
from sts.errors import UserError


@dataclass(frozen=True)
class Recipe:
    """What `sts finetune`'s optimizer does, read from the trainer's own arguments."""

    lrs: tuple[float, ...]  # the learning rate of each optimizer step, first to last
    eps: float  # AdamW's epsilon
    max_norm: float  # the gradient is clipped to this norm before each step

    def reach(self, steps: int) -> float:
        """s_k: how far Adam moves a coordinate whose sign stays put in the first `steps` steps."""
        return float(sum(self.lrs[:steps]))


def recipe(spec: FinetuneSpec) -> Recipe:
    """The learning rate of each of the run's steps as transformers' scheduler gives them (its
    warm-up starts at 0, so step 1 moves nothing), with AdamW's epsilon and the clipping norm."""
    from transformers import get_scheduler

    with tempfile.TemporaryDirectory(prefix="sts-recipe-") as scratch:
        args = sft_args(spec, torch.nn.Linear(1, 1), Path(scratch))
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=args.learning_rate)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(args.max_steps),
                          num_training_steps=args.max_steps)
    lrs = []
    for _ in range(args.max_steps):
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    return Recipe(tuple(lrs), float(args.adam_epsilon), float(args.max_grad_norm))


def check_steps(steps: int, spec: FinetuneSpec) -> None:
    """A step count the lookahead scores can read: one that moves the adapter, within the run."""
    lrs = recipe(spec).lrs
    if not 1 <= steps <= len(lrs):
        raise UserError(f"--steps must be between 1 and the run's --max-steps ({len(lrs)}); got {steps}")
    if sum(lrs[:steps]) == 0:
        raise UserError(f"--steps {steps}: the run's first {steps} step(s) move nothing (its warm-up starts at "
                        "learning rate 0); use --steps 2 or more")


def trainable(model: Any) -> list[torch.nn.Parameter]:
    """The adapter's parameters, in the order `gradients` flattens them."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_state(model: Any) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float().cpu() for p in trainable(model)])


def load_state(model: Any, flat: torch.Tensor) -> None:
    """Set the adapter's parameters from one flat vector (`flat_state`'s order)."""
    at = 0
    with torch.no_grad():
        for p in trainable(model):
            p.copy_(flat[at:at + p.numel()].view_as(p).to(p.dtype))
            at += p.numel()
    if at != flat.numel():
        raise ValueError(f"a state of {flat.numel()} values for an adapter of {at}")


@dataclass
class Lookahead:
    """The adapter where the run starts and after each of `states`' step counts (flat, in
    `flat_state`'s order), and the seconds the steps took."""

    start: torch.Tensor
    states: dict[int, torch.Tensor]
    seconds: float = 0.0

    def displacement(self, steps: int) -> torch.Tensor:
        return self.states[steps] - self.start

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from sts.files import atomic_path

        tensors = {"start": self.start} | {f"step-{k}": v for k, v in self.states.items()}
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": "sts-lookahead/1", "seconds": str(self.seconds)})

    @classmethod
    def load(cls, path: Path) -> Lookahead:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != "sts-lookahead/1":
                raise ValueError(f"{path} is not an sts lookahead file")
            t = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
        return cls(t.pop("start"), {int(k.split("-")[1]): v for k, v in t.items()}, float(meta.get("seconds", 0)))


def lookahead(lm: LoadedModel, examples: list[Example], spec: FinetuneSpec, steps: tuple[int, ...],
              progress: Callable[[str], None] = lambda _m: None) -> Lookahead:
    """Run `sts finetune`'s trainer on `examples` (a copy of the model; its seed, batches, dropout
    and `spec.max_steps` schedule) and keep the adapter after each of `steps`, stopping after the
    last: one run serves every step count."""
    from transformers import TrainerCallback

    spec, usable, _ = trained_records(examples, spec, lm.tokenizer)
    last = max(steps)
    start: list[torch.Tensor] = []
    states: dict[int, torch.Tensor] = {}

    class _Watch(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            start.append(flat_state(model))

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if state.global_step in steps:
                states[state.global_step] = flat_state(model)
            if state.global_step >= last:
                control.should_training_stop = True

    progress(f"lookahead: {last} optimizer steps of the fine-tuning run on {len(usable)} examples")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sts-lookahead-") as scratch:
        trainer = build_trainer(lm, usable, spec, Path(scratch), callbacks=[_Watch()])
        trainer.train()
    return Lookahead(start[0], states, time.perf_counter() - started)


def moved_losses(lm: LoadedModel, spec: FinetuneSpec, domains: dict[str, list[Example]],
                 states: dict[str, torch.Tensor], batch_tokens: int = DOMAIN_BATCH_TOKENS
                 ) -> dict[str, dict[str, float]]:
    """Each domain's loss with the adapter set to each of `states` (label -> flat state), in eval
    mode (no dropout), on one adapted copy of the model."""
    model = adapted(lm, spec)
    out = {}
    for label, flat in states.items():
        load_state(model, flat)
        out[label] = domain_losses(lm, model, domains, batch_tokens, desc=f"loss at {label}")
    return out


def line_point(spec: FinetuneSpec, g: torch.Tensor, start: torch.Tensor, steps: int) -> torch.Tensor:
    """theta0 - s_k u: where a run that kept Adam's first update u (`first_update` of the training
    gradient g) would be after `steps` steps."""
    rec = recipe(spec)
    return start - rec.reach(steps) * first_update(g, rec.max_norm, rec.eps).float()


def drops(base: dict[str, float], moved: dict[str, float]) -> dict[str, float]:
    """The loss drop per domain (higher: the domain gains more), the sign every score uses."""
    return {d: base[d] - moved[d] for d in base}
