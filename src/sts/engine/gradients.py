"""`grad` and `grad-adam`: first-order predictions of a fine-tuning run, with no SAE.

The ground truth (`sts validate`) is a change of a domain's loss. One optimizer step moves the
adapter by -lr x u, where u is the training set's gradient G (SGD) or, in Adam's first step,
G divided per coordinate by the root of its second moment; to first order the domain's loss
then changes by -lr <u, g_D>, g_D the gradient of the domain's ground-truth loss at the same
point. So <G, g_D> (`grad`) and <G / sqrt(v), g_D> (`grad-adam`) are the Taylor terms of
the very quantity measured: the anchor any SAE score is measured against (LESS, arXiv
2402.04333; Grad-TAG, arXiv 2409.06091), in their simplest exact form.

Both sides are taken where `sts finetune`'s first step takes them: the base model with LoRA
adapters on every linear layer, initialised with the fine-tuning seed (B = 0, so only the B
matrices have a gradient), dropout off. The training side renders each example as the
trainer does (`finetuning.sft_records`, the tokenizer's chat template, cut to the fitted
length) with the loss on its response tokens only; G is the token-weighted mean gradient
(the full-batch loss TRL minimises) and v the mean over examples of each example's squared
gradient (what Adam's second moment would hold after one step over every example). The
domain side is the mean over a domain's records of the loss its ground truth measures: the
reference chain of thought's per-token NLL where a record has one (cot_nll; its tokens after
MMLU-Pro's templated opening for cot_nll_content), else the correct option's text after
"Question: ...\\nAnswer:" (nll), rendered as `sts evaluate` renders them.

Both sides are compared through a seeded count sketch (`sketch`, `SKETCH_DIM` buckets; 0:
exact), as LESS projects its gradients (a Rademacher matrix to 8,192 dimensions there; a count
sketch does the same job in one pass over the coordinates and holds no matrix). Why: a domain's
side is the whole adapter's gradient, 4.9M floats (19.5 MB) on the embedded model and tens of
millions on a 7-9B one; sketched it is 256 KB, so the embedded default's domains ship with the
package instead of costing 12 minutes of backward passes on a first run. <S u, S g> is an
unbiased estimate of <u, g> whose error is about |u| |g| / sqrt(SKETCH_DIM); what it costs the
held-out round's numbers is measured in docs/results/heldout/SKETCH.md. The cache keeps the
exact training side (Adam's division and a mixture's weighting act on it before the sketch)
and each domain's exact side where it was computed here, so the sketch can always be undone.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sts.data.examples import Example, unsealed
from sts.engine.finetuning import fitted_length, sft_records
from sts.engine.models import LoadedModel, input_device, plain_model
from sts.engine.settings import FinetuneSpec
from sts.errors import UserError

DOMAIN_BATCH_TOKENS = 2048  # padded tokens per backward pass on the domain side
# padded tokens per backward pass on the training side, by device. On 2 CPU cores a batched pass
# reads no more tokens a second than one example a pass (130 against 132 tok/s) and the per-example
# work over a batch of 2048 tokens costs 27% more (benchmarks/gradient_speed.py, docs/results/speed.md):
# 1 there means one example a pass (the hooks' cost: 2%). On a GPU one example leaves the device idle:
# batches of 16384 tokens (not measured here: no GPU was lent).
TRAIN_BATCH_TOKENS = {"cpu": 1, "mps": 4096, "cuda": 16384}
EPS = 1e-12  # added to v under the root: a coordinate no example moves is not divided by 0
SKETCH_SEED = 0  # the count sketch's buckets and signs (one fixed map: shipped sides must match it)


@functools.lru_cache(maxsize=2)
def _sketch_map(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of n coordinates' bucket in [0, dim) and sign, drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    buckets = torch.randint(0, dim, (n,), generator=gen, dtype=torch.int64)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) * 2 - 1
    return buckets, signs


def sketch(x: torch.Tensor, dim: int, seed: int = SKETCH_SEED) -> torch.Tensor:
    """The count sketch S x in float64: coordinate i added, times its sign, to its bucket."""
    buckets, signs = _sketch_map(x.numel(), dim, seed)
    return torch.zeros(dim, dtype=torch.float64).index_add_(0, buckets, x.double().flatten() * signs)


# TRL's (transformers') AdamW and clipping, as `sts finetune` runs them (`finetuning.sft_args`;
# tests/test_lookahead.py checks them against the trainer's own first steps)
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0


def first_update(g: torch.Tensor, max_norm: float = MAX_GRAD_NORM, eps: float = ADAM_EPS) -> torch.Tensor:
    """Adam's update at its first step that moves, per unit learning rate, when every batch's
    gradient is g: the trainer clips g to norm `max_norm` (c), and after bias correction Adam's
    moments are m = c and v = c^2, so it moves by lr c / (|c| + eps): sign(g) wherever |c| >> eps,
    not g (SGD) nor g / sqrt(mean square over examples); arXiv 2602.00329. Why the first step
    that moves: the trainer's warm-up starts at lr 0, so its first step moves nothing."""
    c = g.double()
    c = c * min(1.0, max_norm / (float(c.norm()) + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
    return c / (c.abs() + eps)


@dataclass
class GradientStats:
    """The training side's G and v, each domain's mean gradient, and what they were read on."""

    train_mean: torch.Tensor  # [P] G: token-weighted mean gradient of the fine-tuning loss ([sketch]: S G)
    train_sq: torch.Tensor | None  # [P] v: mean over examples of each example's squared gradient (None: sketched)
    examples: int
    tokens: int  # response tokens the training loss covers
    domains: dict[str, torch.Tensor]  # domain -> [P] mean gradient of its ground-truth loss ([sketch] if sketched)
    records: dict[str, int]  # domain -> records behind it
    sketch: int = 0  # the domains' sides are count sketches of this dimension (0: exact)
    # the training side read sketched (`TrainingGradients.sketched`): S (G / sqrt(v + EPS)), Adam's
    # direction, which no sketch of v can give back; train_mean is then S G and train_sq None
    train_adam: torch.Tensor | None = None
    train_sign: torch.Tensor | None = None  # sketched: S u, u Adam's first moving update (`first_update`)
    # each training example's part (`PerExample`): its sketched gradient S g_i (a row per example,
    # read against any sketched domain side) or, exact, <g_i, g_D> per domain; its tokens t_i and
    # its position among the examples given
    example_rows: torch.Tensor | None = None
    example_products: dict[str, torch.Tensor] | None = None
    example_tokens: torch.Tensor | None = None
    example_index: list[int] | None = None

    def contributions(self) -> dict[str, torch.Tensor] | None:
        """domain -> each example's term (t_i / T) <g_i, g_D> of `grad` (float64; sketched: <S g_i,
        S g_D>), or None where the pass kept no per-example rows. `grad-adam` and `grad-sign`
        divide or clip the sum G as a whole, so they have no such terms."""
        if self.example_tokens is None:
            return None
        share = self.example_tokens.double() / float(self.example_tokens.sum())
        if self.example_rows is not None and self.sketch:
            rows = self.example_rows.double()
            return {d: share * (rows @ g.double()) for d, g in self.domains.items()}
        if self.example_products is not None and not self.sketch:
            return {d: share * self.example_products[d].double() for d in self.domains}
        return None

    def scores(self, adam: bool = False, sign: bool = False) -> dict[str, float]:
        """<u, g_D> per domain, u = G (grad), G / sqrt(v) (grad-adam) or Adam's first moving update
        (grad-sign, `first_update`): the first-order drop of each domain's loss per unit step
        (higher: the domain's loss falls more); <S u, S g_D> when the domain sides are sketched.
        With per-example rows, `grad` is the sum of its examples' terms (`contributions`), so an
        attribution adds up to the printed score."""
        parts = None if adam or sign else self.contributions()
        if parts is not None:
            return {d: float(c.sum()) for d, c in parts.items()}
        if self.train_sq is None:  # the training side came sketched: u was sketched from the exact G and v
            u = self.train_sign if sign else self.train_adam if adam else self.train_mean
            if u is None:
                raise ValueError("this sketched training side holds no sign direction: recompute it")
            u = u.double()
        else:
            u = self.train_mean.double()
            if sign:
                u = first_update(u)
            elif adam:
                u = u / (self.train_sq.double() + EPS).sqrt()
            if self.sketch:
                u = sketch(u, self.sketch)
        return self.along(u)

    def along(self, u: torch.Tensor) -> dict[str, float]:
        """<u, g_D> per domain for any direction u of the adapter (sketched like the domain sides):
        the first-order drop of each domain's loss when the adapter moves by u (`look-fo`)."""
        return {d: float(u.double() @ g.double()) for d, g in self.domains.items()}

    @staticmethod
    def mixed(parts: list[tuple[GradientStats, float]]) -> GradientStats:
        """A mixture's statistics (`sts.engine.mixture`: each example of a part weighted a_i): G is
        token-weighted and v a mean over examples, so both are weighted means of the parts'."""
        sqs = [g.train_sq for g, _ in parts]
        if any(v is None for v in sqs):
            raise ValueError("a mixture needs its parts' exact training sides (v mixes, S(G / sqrt(v)) does not)")
        tok = [g.tokens * a for g, a in parts]
        ex = [g.examples * a for g, a in parts]
        mean = sum(g.train_mean.double() * t for (g, _), t in zip(parts, tok)) / sum(tok)
        sq = sum(v.double() * e for v, e in zip(sqs, ex) if v is not None) / sum(ex)
        first = parts[0][0]
        return GradientStats(mean.to(first.train_mean.dtype), sq.to(first.train_mean.dtype),  # type: ignore[union-attr]
                             sum(g.examples for g, _ in parts), sum(g.tokens for g, _ in parts),
                             first.domains, first.records, first.sketch)

    @classmethod
    def join(cls, train: TrainingGradients, domains: DomainGradients) -> GradientStats:
        if train.sketch and train.sketch != domains.sketch:
            raise ValueError(f"a training side sketched to {train.sketch} meets domain sides sketched to "
                             f"{domains.sketch}")
        return cls(train.mean, train.sq, train.examples, train.tokens, domains.domains, domains.records,
                   domains.sketch, train.adam, train.sign, train.rows if train.rows is not None and
                   train.rows.shape[1] == domains.sketch else None, train.products, train.row_tokens, train.row_index)


@dataclass
class TrainingGradients:
    """The training side alone (G, v): one backward pass per training example. Sketched
    (`sketched`), it is S G and S (G / sqrt(v + EPS)) in float64 (1 MB at 2^16 instead of 39 MB
    for the embedded model's adapter): enough for both scores of one set, so the embedded
    default's own training side can ship, but not for a mixture, whose v mixes exactly."""

    mean: torch.Tensor  # G, or S G when sketched
    sq: torch.Tensor | None  # v; None when sketched
    examples: int
    tokens: int
    adam: torch.Tensor | None = None  # S (G / sqrt(v + EPS)) when sketched
    sketch: int = 0
    sign: torch.Tensor | None = None  # S first_update(G) when sketched
    # per example (`PerExample`), where the pass kept them: S g_i rows ([examples, dim]) or exact
    # products <g_i, g_D> per domain, the tokens t_i and each row's position among the examples given
    rows: torch.Tensor | None = None
    products: dict[str, torch.Tensor] | None = None
    row_tokens: torch.Tensor | None = None
    row_index: list[int] | None = None

    def kept(self, keep: PerExample, domains: list[str] | None = None) -> TrainingGradients:
        """This side with `keep`'s rows (`training_gradients(keep=...)`); `domains` names the
        exact sides `keep` was read against."""
        products = None if domains is None or keep.rows is None else {
            d: keep.rows[:, j].double() for j, d in enumerate(domains)}
        return dataclasses.replace(self, rows=keep.rows if keep.dim else None, products=products,
                                   row_tokens=keep.tokens, row_index=keep.index)

    def sketched(self, dim: int) -> TrainingGradients:
        """Both directions the scores take, sketched (float64: the exact path's own arithmetic).
        With per-example rows of this dimension, S G is their token-weighted sum (the sketch is
        linear), so the score is exactly the sum of its examples' terms."""
        if self.sketch:
            if self.sketch != dim:
                raise ValueError(f"a training side sketched to {self.sketch} cannot be sketched to {dim}")
            return self
        assert self.sq is not None
        u = self.mean.double() / (self.sq.double() + EPS).sqrt()
        rows = self.rows if self.rows is not None and self.rows.shape[1] == dim else None
        return TrainingGradients(sketch(self.mean, dim), None, self.examples, self.tokens, sketch(u, dim), dim,
                                 sketch(first_update(self.mean), dim), rows, None, self.row_tokens if rows is not None
                                 else None, self.row_index if rows is not None else None)

    def save(self, path: Path) -> None:
        import json

        tensors = {"mean": self.mean} | {k: t for k, t in (("sq", self.sq), ("adam", self.adam), ("sign", self.sign),
                                                           ("rows", self.rows), ("row_tokens", self.row_tokens))
                                         if t is not None}
        if self.products is not None:
            tensors["products"] = torch.stack(list(self.products.values()), 1)
        meta = {"examples": str(self.examples), "tokens": str(self.tokens), "sketch": str(self.sketch)}
        if self.row_index is not None:
            meta["row_index"] = json.dumps(self.row_index)
        if self.products is not None:
            meta["product_domains"] = json.dumps(list(self.products))
        _save(path, "sts-gradients-train/1", tensors, meta)

    @classmethod
    def load(cls, path: Path) -> TrainingGradients:
        import json

        t, meta = _load(path, "sts-gradients-train/1")
        names = json.loads(meta.get("product_domains", "[]"))
        products = {d: t["products"][:, j] for j, d in enumerate(names)} if names else None
        index = json.loads(meta["row_index"]) if "row_index" in meta else None
        return cls(t["mean"], t.get("sq"), int(meta["examples"]), int(meta["tokens"]), t.get("adam"),
                   int(meta.get("sketch", "0")), t.get("sign"), t.get("rows"), products, t.get("row_tokens"), index)


@dataclass
class DomainGradients:
    """The domain side alone: each domain's mean gradient. It depends on the model, the records
    and the adapter's initialisation only (`domain_side_key`), not on the training set, so it is
    cached apart: with long reference records it is most of the cost (on 2 CPU cores, 1,000
    chains of thought take over an hour, 100 training examples minutes)."""

    domains: dict[str, torch.Tensor]
    records: dict[str, int]
    sketch: int = 0  # each side is a count sketch of this dimension (0: the exact gradient)

    def sketched(self, dim: int) -> DomainGradients:
        """The same sides as count sketches of dimension `dim` (float32: 256 KB a domain at 2^16)."""
        if self.sketch:
            if self.sketch != dim:
                raise ValueError(f"sides sketched to {self.sketch} cannot be sketched to {dim}")
            return self
        return DomainGradients({d: sketch(g, dim).float() for d, g in self.domains.items()}, dict(self.records), dim)

    def save(self, path: Path) -> None:
        import json

        names = list(self.domains)
        _save(path, "sts-gradients-domains/1", {"domains": torch.stack([self.domains[n] for n in names])},
              {"names": json.dumps(names), "records": json.dumps(self.records), "sketch": str(self.sketch)})

    @classmethod
    def load(cls, path: Path) -> DomainGradients:
        import json

        t, meta = _load(path, "sts-gradients-domains/1")
        names = json.loads(meta["names"])
        return cls({n: t["domains"][i] for i, n in enumerate(names)}, json.loads(meta["records"]),
                   int(meta.get("sketch", "0")))


def _save(path: Path, fmt: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from sts.files import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": fmt} | meta)


def _load(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        t = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not an sts gradients file ({fmt})")
    return t, meta


def domain_side_key(spec: FinetuneSpec, batch_tokens: int = DOMAIN_BATCH_TOKENS) -> dict[str, Any]:
    """What the domain side depends on besides the model and the records: the adapter as the
    seed initialises it (rank, alpha, seed; dropout is off in eval mode, the learning rate,
    steps and lengths only act on the training side)."""
    return {"lora": spec.lora, "r": spec.lora_r, "alpha": spec.alpha, "seed": spec.seed,
            "batch_tokens": batch_tokens}


def first_step_key(spec: FinetuneSpec) -> dict[str, Any]:
    """What the gradients at the first step depend on: the adapter as initialised and the length
    the training examples are cut to; not the learning rate, the step count or the batch size,
    which act after it (a validate stage keyed on this is kept when only those change)."""
    return domain_side_key(spec) | {"max_length": spec.max_length}


def adapted(lm: LoadedModel, spec: FinetuneSpec) -> Any:
    """A copy of the model with the LoRA adapter `sts finetune` trains, as initialised with its
    seed (peft's LoraConfig on every linear layer), in eval mode (no dropout)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    if not spec.lora:
        raise UserError("the gradient scores read the LoRA adapter's first step; full fine-tuning (--full) "
                        "has no adapter to take it in")
    set_seed(spec.seed)
    model = get_peft_model(copy.deepcopy(plain_model(lm.model)),
                           LoraConfig(r=spec.lora_r, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                                      target_modules="all-linear", task_type="CAUSAL_LM"))
    if spec.gradient_checkpointing:  # a 7-9B model's activations: recompute them in the backward pass
        # non-reentrant: the frozen embedding's output needs no grad for the adapter's to flow
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.eval()


def _flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float().cpu()
                      for p in params])


def training_items(lm: LoadedModel, examples: list[Example], spec: FinetuneSpec) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per training record, rendered and cut as the trainer does
    (records whose prompt fills the fitted length are dropped, as `finetune` drops them)."""
    return [item for _, item in indexed_training_items(lm, examples, spec)]


def indexed_training_items(lm: LoadedModel, examples: list[Example], spec: FinetuneSpec
                           ) -> list[tuple[int, tuple[list[int], int]]]:
    """`training_items`, each with its record's position among `examples` (what an attribution
    names: records without a response, or whose prompt fills the length, have no item)."""
    from trl.data_utils import apply_chat_template

    from sts.engine.finetuning import has_response, token_lengths

    tok = lm.tokenizer
    max_length = spec.max_length or fitted_length(token_lengths(examples, tok))
    positions = [i for i, e in enumerate(examples) if has_response(e)]
    items = []
    for pos, rec in zip(positions, sft_records(examples, tok)):
        if isinstance(rec["prompt"], list):
            rec = apply_chat_template(rec, tok)
        prompt = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        full = tok(rec["prompt"] + rec["completion"], add_special_tokens=False)["input_ids"][:max_length]
        if len(prompt) < len(full):
            items.append((pos, (full, len(prompt))))
    if not items:
        raise UserError("no training record keeps a response token within the fine-tuning length; "
                        "raise --max-length")
    return items


def domain_items(lm: LoadedModel, examples: list[Example], content: bool = False) -> list[tuple[list[int], int]]:
    """(token ids, context length) per domain record: its reference chain of thought where it has
    one (cot_nll's rendering), else its correct option's text (nll's). `content`: the reference's
    templated opening joins the context, so the loss is cot_nll_content's (the tokens after it)."""
    from sts.data.examples import LETTERS
    from sts.engine.evaluation import _cloze_scoring, _cot_scoring

    unsealed(examples, "a gradient domain side")
    items = []
    for ex in examples:
        scoring = _cot_scoring(lm.tokenizer, ex) if ex.cot else _cloze_scoring(lm.tokenizer, ex, [])
        if scoring is None:
            continue
        cont = scoring.continuations[0 if ex.cot else LETTERS.index(ex.answer or "A")]
        start = len(scoring.context) + (scoring.tails[0] if content and ex.cot else 0)
        if len(scoring.context) + len(cont) > start:
            items.append((scoring.context + cont, start))
    return items


def _loss(model: Any, batch: list[tuple[list[int], int]], weights: list[float], device: torch.device,
          pad: int) -> torch.Tensor:
    """sum over the batch of weight x (mean per-token NLL of each item's continuation).

    The LM head (a third of a small model's cost) runs only from the first position that predicts a
    continuation token on (`logits_to_keep`): a reference record's context is most of its tokens."""
    width = max(len(ids) for ids, _ in batch)
    first = max(1, min(start for _, start in batch))  # the first position whose token is scored
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    target = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        target[i, start:len(seq)] = torch.tensor(seq[start:])
    kept = width - first + 1  # positions first - 1 .. width - 1: each predicts the token after it
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    try:
        out = model(**inputs, logits_to_keep=kept)
    except TypeError:  # a model whose forward takes no logits_to_keep (remote code): the head everywhere
        out = model(**inputs)
    logits = out.logits[:, -kept:][:, :-1].float()
    labels = target[:, first:].to(device)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    per_item = nll.sum(1) / (labels != -100).sum(1).clamp(min=1)
    return (per_item * torch.tensor(weights, device=device)).sum()


def gradient_stats(lm: LoadedModel, train: list[Example], domains: dict[str, list[Example]],
                   spec: FinetuneSpec, batch_tokens: int = DOMAIN_BATCH_TOKENS,
                   progress: Callable[[str], None] = lambda _m: None) -> GradientStats:
    """G and v over the training examples (one backward pass each), and each domain's mean
    gradient (batched by padded tokens)."""
    model = adapted(lm, spec)
    return GradientStats.join(training_side(lm, model, train, spec, progress),
                              domain_side(lm, model, domains, batch_tokens, progress))


def training_side(lm: LoadedModel, model: Any, train: list[Example], spec: FinetuneSpec,
                  progress: Callable[[str], None] = lambda _m: None, keep: PerExample | None = None,
                  against: list[str] | None = None) -> TrainingGradients:
    """G and v of the training set; with `keep`, each example's row too (`against`: the names of
    the exact domain sides `keep` reads, in its order)."""
    progress(f"gradients: {len(train)} training examples (LoRA r={spec.lora_r}, "
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} adapter parameters)")
    side = TrainingGradients(*training_gradients(lm, model, train, spec, keep=keep))
    return side if keep is None else side.kept(keep, against)


def domain_side(lm: LoadedModel, model: Any, domains: dict[str, list[Example]],
                batch_tokens: int = DOMAIN_BATCH_TOKENS, progress: Callable[[str], None] = lambda _m: None,
                content: bool = False) -> DomainGradients:
    progress(f"gradients: {sum(len(v) for v in domains.values())} domain records ({', '.join(domains)})"
             + (" after the references' templated openings" if content else ""))
    return DomainGradients(*domain_gradients(lm, model, domains, batch_tokens, content))


@dataclass
class PerExample:
    """Each training example's part of the training side, kept as the pass computes it (LESS and
    TrackStar keep the same rows; here they come free with the pass `grad` already makes).

    G = sum_i (t_i / T) g_i, so `grad`(D) = <G, g_D> = sum_i (t_i / T) <g_i, g_D>: each term is
    example i's exact share of the score. The rows are S g_i, the example's gradient through the
    shipped count sketch (`dim` > 0: any domain side sketched alike reads them later), or
    <g_i, g_D> against given exact domain sides (`against`, [domains, P]: no P-wide row is kept)."""

    dim: int = 0
    against: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # [examples, dim] (float32) or [examples, domains] (float64)
    tokens: torch.Tensor | None = None  # [examples] t_i, the response tokens the loss covers
    index: list[int] | None = None  # each row's record: its position among the examples given

    def __post_init__(self) -> None:
        if (self.dim > 0) == (self.against is not None):
            raise ValueError("keep per-example rows either sketched (dim > 0) or against exact sides, not both")

    def take(self, per: torch.Tensor) -> torch.Tensor:
        """A batch's rows from its exact per-example gradients [b, P] (float64)."""
        if self.against is not None:
            return per @ self.against.double().T
        buckets, signs = _sketch_map(per.shape[1], self.dim, SKETCH_SEED)
        return torch.zeros(per.shape[0], self.dim, dtype=torch.float64).index_add_(1, buckets, per * signs)


def training_gradients(lm: LoadedModel, model: Any, train: list[Example], spec: FinetuneSpec,
                       batch_tokens: int | None = None, keep: PerExample | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(G, v, examples, response tokens) of the training set on the adapted `model`: examples in
    batches of at most `batch_tokens` padded tokens (sorted by length; default by device,
    TRAIN_BATCH_TOKENS), each example's own gradient recovered from the batch's one backward
    pass (`per_example.PerExampleGrads`). `keep` also receives each example's row (`PerExample`),
    in the examples' order. Under several processes (`sts.engine.distributed`) each reads its
    share of the examples and the sums are reduced: every process returns the same."""
    from tqdm.auto import tqdm

    from sts.engine.distributed import reduce_sum, shard, world
    from sts.engine.per_example import PerExampleGrads

    w = world()
    params = [p for p in model.parameters() if p.requires_grad]
    device, pad = input_device(model), int(lm.tokenizer.pad_token_id or 0)
    if batch_tokens is None:
        batch_tokens = TRAIN_BATCH_TOKENS.get(device.type, TRAIN_BATCH_TOKENS["cuda"])
    indexed = indexed_training_items(lm, train, spec)
    row_of = {id(item): r for r, (_, item) in enumerate(indexed)}  # an item's row: its place in the given order
    items = shard(sorted((item for _, item in indexed), key=lambda it: len(it[0])), w)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    sq = torch.zeros_like(total)
    counted = torch.zeros(2, dtype=torch.float64)  # examples, response tokens
    width = 0 if keep is None else keep.dim or len(keep.against)  # type: ignore[arg-type]
    rows = torch.zeros(len(indexed) if keep else 0, width, dtype=torch.float64)  # this process's rows, zero elsewhere
    hooks = PerExampleGrads(model, params)
    try:
        with tqdm(total=sum(len(seq) for seq, _ in items), desc="gradient (training)", unit="tok", unit_scale=True,
                  file=sys.stderr, disable=not w.main) as bar:
            for batch in _batches(items, batch_tokens):
                model.zero_grad(set_to_none=True)
                _loss(model, batch, [1.0] * len(batch), device, pad).backward()
                per = hooks.flat().double()
                counts = torch.tensor([len(seq) - start for seq, start in batch], dtype=torch.float64)
                total += counts @ per
                sq += (per * per).sum(0)
                counted += torch.tensor([len(batch), float(counts.sum())], dtype=torch.float64)
                if keep is not None:
                    rows[[row_of[id(it)] for it in batch]] = keep.take(per)
                bar.update(sum(len(seq) for seq, _ in batch))
    finally:
        hooks.remove()
        model.zero_grad(set_to_none=True)
    reduce_sum([total, sq, counted] + ([rows] if keep is not None else []), w)
    examples, tokens = int(counted[0]), int(counted[1])
    if keep is not None:
        keep.rows = rows.float() if keep.dim else rows
        keep.tokens = torch.tensor([len(seq) - start for _, (seq, start) in indexed], dtype=torch.int64)
        keep.index = [pos for pos, _ in indexed]
    return (total / tokens).float(), (sq / examples).float(), examples, tokens


def domain_gradients(lm: LoadedModel, model: Any, domains: dict[str, list[Example]],
                     batch_tokens: int = DOMAIN_BATCH_TOKENS, content: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Each domain's mean gradient of its ground-truth loss on the adapted `model` (the same
    for every training set of one LoRA spec: the adapter starts where the seed puts it);
    `content`: cot_nll_content's loss (`domain_items`). Under several processes each reads its
    share of a domain's records (weighted by the domain's whole count) and the sums are reduced."""
    from tqdm.auto import tqdm

    from sts.engine.distributed import reduce_sum, shard, world

    w = world()
    params = [p for p in model.parameters() if p.requires_grad]
    device, pad = input_device(model), int(lm.tokenizer.pad_token_id or 0)
    per_domain: dict[str, torch.Tensor] = {}
    records: dict[str, int] = {}
    for name, exs in domains.items():
        d_items = sorted(domain_items(lm, exs, content), key=lambda it: len(it[0]))
        if not d_items:
            raise UserError(f"domain {name}: no record with a correct option or a reference chain of thought")
        mine = shard(d_items, w)
        model.zero_grad(set_to_none=True)
        with tqdm(total=sum(len(ids) for ids, _ in mine), desc=f"gradient ({name})", unit="tok", unit_scale=True,
                  file=sys.stderr, leave=False, disable=not w.main) as bar:  # tokens: an honest rate and remaining time
            for b in _batches(mine, batch_tokens):
                _loss(model, b, [1.0 / len(d_items)] * len(b), device, pad).backward()  # grads accumulate
                bar.update(sum(len(ids) for ids, _ in b))
        per_domain[name], records[name] = reduce_sum([_flat_grad(params)], w)[0], len(d_items)
    return per_domain, records


def _batches(items: list[tuple[list[int], int]], batch_tokens: int) -> list[list[tuple[list[int], int]]]:
    """Items (sorted by length) in batches of at most `batch_tokens` padded tokens."""
    batches: list[list[tuple[list[int], int]]] = []
    batch: list[tuple[list[int], int]] = []
    for it in items:
        if batch and (len(batch) + 1) * len(it[0]) > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(it)
    return batches + [batch] if batch else batches  # no items (a process's empty share): no batch


def domain_losses(lm: LoadedModel, model: Any, domains: dict[str, list[Example]],
                  batch_tokens: int = DOMAIN_BATCH_TOKENS, desc: str = "loss") -> dict[str, float]:
    """Each domain's ground-truth loss on `model` as it stands (forward passes only): the mean over
    its records of the per-token NLL that `domain_gradients` differentiates (cot_nll on reference
    chains of thought), so that a loss change between two adapters is the measured quantity
    itself, read on these records (`sts.engine.lookahead`). Under several processes each reads
    every N-th record and the sums are reduced, as for the gradient sides."""
    from tqdm.auto import tqdm

    from sts.engine.distributed import reduce_sum, shard, world

    w = world()
    device, pad = input_device(model), int(lm.tokenizer.pad_token_id or 0)
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, exs in domains.items():
            d_items = sorted(domain_items(lm, exs), key=lambda it: len(it[0]))
            if not d_items:
                raise UserError(f"domain {name}: no record with a correct option or a reference chain of thought")
            total = torch.tensor([float(sum(_loss(model, b, [1.0 / len(d_items)] * len(b), device, pad)
                                            for b in tqdm(_batches(shard(d_items, w), batch_tokens),
                                                          desc=f"{desc} ({name})", unit="batch", file=sys.stderr,
                                                          leave=False)))], dtype=torch.float64)
            out[name] = float(reduce_sum([total], w)[0])
    return out
