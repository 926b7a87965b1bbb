"""Extraction: examples -> model inputs -> SAE features -> per-feature sufficient statistics.

Both the shift and the domain score are sums over tokens, so we stream
(count, sum f, sum f^2, firing count, and for paired runs sum (f_b - f_a)^2) per feature and
never hold a `[tokens, d_sae]` matrix: memory is O(batch x d_sae), whatever the dataset size.
The dense `.pt` export of the reference implementation is the one exception, by contract.

Model inputs are `Sequence`s: token ids plus the positions whose features count. Paired runs
(`Pair`) carry two sequences whose counted positions correspond one to one: the same example
with and without in-context demonstrations (`icl`), or identical tokens read by two models
(`sft`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sts.choices import Format, Method, Readout, Responses, Tokens, parse
from sts.data import Example
from sts.errors import UserError, no_tokens
from sts.files import GENERATED, atomic_path
from sts.generate import Generation
from sts.models import (
    HookPoint,
    LoadedModel,
    Placement,
    ResidualReader,
    check_layer,
    layer_device,
    model_shape,
    pad_batch,
    prefix_cache,
)
from sts.saes import LoadedSAE, check_width

# --- rendering and tokenization --------------------------------------------------------

@dataclass(frozen=True)
class Render:
    """How examples become text. `chat`: use the tokenizer's chat template (what an instruct
    model is fine-tuned on); `with_response`: include the response turn; `tokens`: count all
    tokens, or only the response's (what SFT trains on; examples without a response count
    all of their own tokens)."""

    chat: bool = False
    with_response: bool = True
    tokens: str = "all"
    # Leave out each sequence's first token. It is the attention sink: its residual norm is
    # tens of times the median, the SAE was trained without it (train_sae), and in
    # SmolLM2-135M it carried 99% of the domain score's mass over the shifted features, which
    # made STS a measure of 1/question length. Off for the reference's dense contract.
    skip_first: bool = False


@dataclass(frozen=True)
class Sequence:
    ids: list[int]
    positions: list[int]  # indices into ids whose features are counted
    # Tokens before `ids`, shared by many sequences (a domain's demonstrations): read once
    # through the model's key/value cache instead of once per sequence.
    prefix: tuple[int, ...] = ()


@dataclass(frozen=True)
class Pair:
    a: Sequence  # base
    b: Sequence  # shifted; b.positions[i] is the same token as a.positions[i]
    cut: int = 0  # example tokens cut from the end (both sides) to fit max_length
    head: int = 0  # tokens of the shifted side before the example (demonstrations, template)


def _text(ex: Example, tok: Any, render: Render, demos: tuple[Example, ...] = ()
          ) -> tuple[str, bool, tuple[int, int] | None]:
    """Render -> (text, add_special_tokens, char span of the example's response or None)."""
    response = ex.response if render.with_response else None
    if render.chat and getattr(tok, "chat_template", None):
        msgs: list[dict[str, str]] = []
        for d in demos:
            msgs += [{"role": "user", "content": d.prompt},
                     {"role": "assistant", "content": d.response or ""}]
        msgs += [{"role": r, "content": c} for r, c in ex.history]
        msgs.append({"role": "user", "content": ex.prompt})
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=response is None)
        special = False  # the template already holds BOS and turn markers
    else:
        parts = [d.prompt + ("\n" + d.response if d.response else "") for d in demos]
        own = ex.prompt if response is None else f"{ex.prompt}\n{response}"
        text, special = "\n\n".join(parts + [own]), True
    span = None
    if response is not None and response.strip():
        start = text.rfind(response.strip())
        if start >= 0:
            span = (start, start + len(response.strip()))
    return text, special, span


def _encode(tok: Any, text: str, special: bool, max_length: int | None, keep_end: bool = False
            ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets, truncated to max_length: the start is kept, or the
    end (`keep_end`, for inputs with demonstrations, whose example sits at the end)."""
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if max_length is not None and len(ids) > max_length:
        cut = slice(len(ids) - max_length, None) if keep_end else slice(0, max_length)
        ids, offsets = ids[cut], offsets[cut]
    return ids, offsets


def _selected(offsets: list[tuple[int, int]], span: tuple[int, int] | None, tokens: str,
              start: int = 0) -> list[int]:
    """Positions to count: all tokens from char `start` on, or those overlapping `span`."""
    if tokens == "response" and span is not None:
        s, e = span
        return [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
    return [i for i, (a, b) in enumerate(offsets) if a >= start and (b > a or start == 0)]


def _sequence(tok: Any, text: str, special: bool, span: tuple[int, int] | None, tokens: str,
              max_length: int | None) -> Sequence:
    if tokens == "all":  # exactly tokenizer(text)["input_ids"], every position counted
        ids = list(tok(text, add_special_tokens=special)["input_ids"])[:max_length]
        return Sequence(ids, list(range(len(ids))))
    ids, offsets = _encode(tok, text, special, max_length)
    return Sequence(ids, _selected(offsets, span, tokens))


def sequences(examples: Iterable[Example], tok: Any, render: Render,
              max_length: int | None = None) -> Iterator[Sequence]:
    """One model input per example. For plain text with `tokens='all'` the ids are exactly
    `tokenizer(text)["input_ids"]` and every position counts (the reference's contract)."""
    for ex in examples:
        seq = _sequence(tok, *_text(ex, tok, render), render.tokens, max_length)
        yield Sequence(seq.ids, [p for p in seq.positions if p > 0]) if render.skip_first else seq


def icl_sequences(examples: list[Example], tok: Any, render: Render, n_demos: int = 2,
                  seed: int = 0, max_length: int | None = None) -> Iterator[Sequence]:
    """Each example with `n_demos` demonstrations prepended, as one stream (method `paper`)."""
    rng = random.Random(seed)
    for i, ex in enumerate(examples):
        demos = draw_demos(examples, n_demos, i, rng)
        yield _sequence(tok, *_text(ex, tok, render, demos), "all", max_length)


def _common_suffix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Truncation:
    """What fitting ICL pairs into `max_length` did. Demonstrations are never cut: the example
    is cut from its end, identically on both sides, so an over-long pair keeps its context
    and loses (counted) example tokens instead of silently losing its demonstrations."""

    examples: int = 0
    cut: int = 0  # examples whose end was cut
    tokens_cut: int = 0
    max_cut: int = 0
    empty: int = 0  # examples left with no aligned token
    max_demo_tokens: int = 0  # longest run of tokens before the example on the shifted side

    def add(self, pair: Pair) -> Pair:
        self.examples += 1
        self.cut += pair.cut > 0
        self.tokens_cut += pair.cut
        self.max_cut = max(self.max_cut, pair.cut)
        self.empty += not pair.a.positions
        self.max_demo_tokens = max(self.max_demo_tokens, pair.head)
        return pair

    def check(self, what: str, max_length: int | None, demos_extra: bool = False) -> None:
        """Warn about cut examples and examples left without an aligned token; stop when no
        example kept one. `demos_extra`: the demonstrations do not count against max_length
        (a domain's fixed demonstrations), so a cut is the question's own, as in its single run."""
        from sts.errors import warn

        if self.examples and self.empty == self.examples:
            if demos_extra:
                raise UserError(f"no {what} keeps an aligned token after its demonstrations; check "
                                "the questions and the demonstrations' text")
            raise UserError(
                f"no {what} keeps an aligned token with its demonstrations in context: the "
                f"demonstrations take up to {self.max_demo_tokens} tokens of --max-length "
                f"{max_length}; raise --max-length or use fewer or shorter demonstrations")
        if self.cut and demos_extra:
            warn(f"{self.cut} of {self.examples} {what}s are longer than --max-length {max_length}: "
                 f"cut as in their single run (mean {self.tokens_cut / self.cut:.0f}, max {self.max_cut} "
                 "tokens), after their demonstrations")
        elif self.cut:
            warn(f"{self.cut} of {self.examples} {what}s did not fit --max-length {max_length} with "
                 f"their demonstrations: their ends were cut (mean {self.tokens_cut / self.cut:.0f}, "
                 f"max {self.max_cut} tokens; demonstrations kept whole)")
        if self.empty:
            warn(f"{self.empty} of {self.examples} {what}s kept no aligned token and add nothing")


def align(tok: Any, ex: Example, demos: tuple[Example, ...], render: Render,
          max_length: int | None = None, demos_extra: bool = False) -> Pair:
    """The example with and without `demos` prepended, compared on the example's own tokens:
    a token of one is matched to a token of the other when both have the same id and the same
    character span relative to the start of the example's text (the common suffix of the two
    renderings). Tokens whose split differs across the boundary simply go unmatched.

    Truncation keeps the demonstrations whole and cuts the example's end, by the same number
    of example tokens on both sides. `max_length` bounds the shifted input; with `demos_extra`
    it bounds the example alone (side a is then exactly the example's single-run input) and
    the demonstrations come on top: a domain's fixed demonstrations."""
    text_a, special, span = _text(ex, tok, render)
    text_b, _, _ = _text(ex, tok, render, demos)
    n = _common_suffix(text_a, text_b)
    start_a, start_b = len(text_a) - n, len(text_b) - n
    ids_a, off_a = _encode(tok, text_a, special, None)
    ids_b, off_b = _encode(tok, text_b, special, None)
    head_a = _head(off_a, start_a)  # template (and BOS) before the example
    head_b = _head(off_b, start_b)  # ... plus the demonstrations
    own_b = len(ids_b) - head_b
    keep = own_b
    if max_length is not None:
        keep = min(len(ids_a), max_length) - head_a if demos_extra else max_length - head_b
        keep = max(0, min(keep, own_b))
    full_a = len(ids_a)
    ids_a, off_a = ids_a[: head_a + keep], off_a[: head_a + keep]
    if max_length is not None and not demos_extra:
        ids_a, off_a = ids_a[:max_length], off_a[:max_length]
    ids_b, off_b = ids_b[: head_b + keep], off_b[: head_b + keep]
    # With fixed demonstrations the question is cut as in its single run (counted on side a:
    # the question may split into a token more or fewer after the demonstrations).
    cut = full_a - len(ids_a) if demos_extra else own_b - keep
    selected = set(_selected(off_a, span, render.tokens, start_a))
    if render.skip_first:
        selected.discard(0)  # the attention sink of the plain input
    index_a = {(s - start_a, e - start_a, t): i for i, ((s, e), t) in enumerate(zip(off_a, ids_a))
               if i in selected and s >= start_a}
    pos_a: list[int] = []
    pos_b: list[int] = []
    for j, ((s, e), t) in enumerate(zip(off_b, ids_b)):
        i = index_a.get((s - start_b, e - start_b, t)) if s >= start_b else None
        if i is not None:
            pos_a.append(i)
            pos_b.append(j)
    return Pair(Sequence(ids_a, pos_a), Sequence(ids_b, pos_b), cut=cut, head=head_b)


def _head(offsets: list[tuple[int, int]], start: int) -> int:
    """Number of leading tokens before the example's text (which begins at char `start`)."""
    return next((i for i, (s, e) in enumerate(offsets) if s >= start and e > s), len(offsets))


def domain_icl_pairs(examples: Iterable[Example], demos: dict[str, tuple[Example, ...]], tok: Any,
                     render: Render, max_length: int | None = None,
                     report: Truncation | None = None) -> Iterator[Pair]:
    """Each domain question without and with its own domain's fixed demonstrations (STS_ICL).
    `max_length` bounds the question, as in the domain's single run; demonstrations come on top."""
    report = report if report is not None else Truncation()
    for ex in examples:
        domain = ex.domain or "all"  # unlabelled records form one domain, as Dataset.by_domain
        if domain not in demos:
            raise UserError(f"no demonstrations for domain {domain!r}; give --domain-demos with "
                            "records of every domain")
        yield shared_prefix(report.add(align(tok, ex, demos[domain], render, max_length, demos_extra=True)))


def shared_prefix(pair: Pair) -> Pair:
    """Side b with its tokens before the example (demonstrations and template) moved into
    `prefix`: identical tokens, so identical features, at a fraction of the cost when many
    questions share the same demonstrations."""
    b, head = pair.b, pair.head
    if head == 0 or any(p < head for p in b.positions):
        return pair
    rest = Sequence(b.ids[head:], [p - head for p in b.positions], tuple(b.ids[:head]))
    return Pair(pair.a, rest, pair.cut, pair.head)


def same_token_pairs(examples: Iterable[Example], tok: Any, render: Render,
                     max_length: int | None = None) -> Iterator[Pair]:
    """Identical tokens on both sides (method `sft`: base model vs fine-tuned model)."""
    for seq in sequences(examples, tok, render, max_length):
        yield Pair(seq, seq)


def draw_demos(pool: list[Example], n: int, exclude: int, rng: random.Random) -> tuple[Example, ...]:
    """n demonstrations from the pool (those with a response), never the example itself."""
    candidates = [i for i in range(len(pool)) if i != exclude and pool[i].response]
    if n > len(candidates):
        raise UserError(f"asked for {n} demonstrations but the training set has only "
                        f"{len(candidates)} other examples with a response; lower --demos")
    return tuple(pool[i] for i in rng.sample(candidates, n))


def icl_pairs(examples: list[Example], tok: Any, render: Render, n_demos: int = 2, seed: int = 0,
              max_length: int | None = None, report: Truncation | None = None) -> Iterator[Pair]:
    """Each training example without and with `n_demos` demonstrations from the same set."""
    rng = random.Random(seed)
    report = report if report is not None else Truncation()
    for i, ex in enumerate(examples):
        yield report.add(align(tok, ex, draw_demos(examples, n_demos, i, rng), render, max_length))


# --- statistics ------------------------------------------------------------------------

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

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sum_sq / max(self.count, 1)


@dataclass
class Stats:
    """What `sts extract` writes: one run's stats, or a paired run's (base `a`, shifted `b`,
    and sum over aligned tokens of (f_b - f_a)^2)."""

    a: FeatureStats
    b: FeatureStats | None = None
    sum_sq_diff: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Paired runs over examples (icl, sft): each example's own sum of (f_b - f_a)^2, sparse
    # (example index, feature, value). Lets `sts correlate` bootstrap the shifted-feature
    # estimate by resampling training examples; the per-example sums add up to sum_sq_diff.
    per_example: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    examples: int | None = None  # examples behind per_example (trailing ones may have no entry)

    def example_shift(self, features: list[int]) -> torch.Tensor:
        """[examples, len(features)] float64: each example's shift on the given features."""
        if self.per_example is None:
            raise ValueError("these statistics carry no per-example shifts")
        rows, cols, vals = self.per_example
        n = int(rows.max()) + 1 if rows.numel() else 0
        n = max(n, self.examples or 0)
        where = torch.full((self.a.d_sae,), -1, dtype=torch.long)
        where[torch.tensor(features, dtype=torch.long)] = torch.arange(len(features))
        keep = where[cols.long()] >= 0
        out = torch.zeros(n, len(features), dtype=torch.float64)
        out.index_put_((rows.long()[keep], where[cols.long()[keep]]), vals[keep].double(), accumulate=True)
        return out

    @property
    def paired(self) -> bool:
        return self.b is not None

    def save(self, path: str | Path) -> None:
        """safetensors with the statistics, and JSON provenance in its metadata header."""
        tensors = {"count": torch.tensor([self.a.count]), "sum": self.a.sum,
                   "sum_sq": self.a.sum_sq, "fires": self.a.fires}
        if self.b is not None and self.sum_sq_diff is not None:
            tensors |= {"b.count": torch.tensor([self.b.count]), "b.sum": self.b.sum,
                        "b.sum_sq": self.b.sum_sq, "b.fires": self.b.fires,
                        "sum_sq_diff": self.sum_sq_diff}
        if self.per_example is not None:
            tensors |= dict(zip(("example.row", "example.col", "example.value"), self.per_example))
            tensors["example.count"] = torch.tensor([self.examples or 0])
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "sts-stats/1", "sts": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                header = fh.metadata() or {}
            t = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise UserError(f"{path}: not a readable sts statistics file ({exc})") from None
        if header.get("format") != "sts-stats/1":
            raise UserError(f"{path}: not an sts statistics file (write one with `sts extract`)")
        a = FeatureStats(int(t["count"][0]), t["sum"], t["sum_sq"], t["fires"])
        b = None
        if "b.sum" in t:
            b = FeatureStats(int(t["b.count"][0]), t["b.sum"], t["b.sum_sq"], t["b.fires"])
        per_example = None
        if "example.row" in t:
            per_example = (t["example.row"], t["example.col"], t["example.value"])
        examples = int(t["example.count"][0]) if "example.count" in t else None
        return cls(a, b, t.get("sum_sq_diff"), json.loads(header.get("sts", "{}")), per_example, examples)


def check_fits(sae: LoadedSAE, point: HookPoint, model_spec: str) -> None:
    """SAE width vs hidden size and the layer, from the model's config alone: bad pairs fail
    before minutes are spent loading a large model's weights."""
    hidden, n_layers = model_shape(model_spec)
    check_width(sae, hidden, model_spec)
    check_layer(point, n_layers, model_spec)


# --- the engine ------------------------------------------------------------------------

READOUTS = ("sae", "raw")  # SAE features, or the hooked layer's raw residual dimensions


class Extractor:
    """Reads SAE features (and, on request, the raw residual stream: the paper's baseline)
    of counted tokens, batch by batch, up to the hook point only. One forward pass serves
    every readout asked for."""

    def __init__(self, lm: LoadedModel, sae: LoadedSAE, point: HookPoint, batch_size: int | None = None,
                 batch_tokens: int = 4096):
        check_width(sae, lm.hidden_size, lm.spec)
        if batch_size is not None and batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
        if batch_tokens < 1:
            raise UserError(f"--batch-tokens must be at least 1 (got {batch_tokens})")
        self.lm, self.sae, self.point = lm, sae, point
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.reader = ResidualReader(lm, point)
        self.device = layer_device(lm, point.layer)
        if sae.sae.W_enc.device != self.device:  # the SAE sits beside the hooked layer
            sae.sae.to(self.device)
        # float64 sums where the device has them (Apple GPUs do not: the host then sums)
        self.stats_device = torch.device("cpu") if self.device.type == "mps" else self.device
        self.pad_id = int(lm.tokenizer.pad_token_id or 0)
        self._prefixes: dict[tuple[int, ...], Any] = {}

    def width(self, readout: str) -> int:
        return self.sae.d_sae if readout == "sae" else self.lm.hidden_size

    def read(self, batch: list[Sequence], readouts: tuple[str, ...] = ("sae",)) -> dict[str, torch.Tensor]:
        """readout -> [sum of counted positions, width], in sequence then position order.
        Right padding under the attention mask: pad tokens never influence or enter counts."""
        batch = [s for s in batch if s.positions]  # nothing counted: no need to run it
        if not batch:
            return {r: torch.zeros(0, self.width(r), device=self.device) for r in readouts}
        rows = [i for i, s in enumerate(batch) for _ in s.positions]
        cols = [p for s in batch for p in s.positions]
        if any(s.prefix != batch[0].prefix for s in batch):  # runs of one prefix each, in order
            parts = [self.read(run, readouts) for run in _runs(batch)]
            return {r: torch.cat([p[r] for p in parts]) for r in readouts}
        self._check_length(max(len(s.prefix) + len(s.ids) for s in batch))
        past = self._prefix(batch[0].prefix) if batch[0].prefix else None
        if batch[0].prefix and past is None:  # the cache cannot serve this hook: encode whole
            return self.read([_whole(s) for s in batch], readouts)
        ids, mask = pad_batch([s.ids for s in batch], self.pad_id)
        if past is not None:
            past = copy.deepcopy(past)
            past.batch_repeat_interleave(len(batch))
            mask = torch.cat([torch.ones(len(batch), len(batch[0].prefix), dtype=mask.dtype), mask], 1)
        acts = self.reader(ids, mask, past)[torch.tensor(rows), torch.tensor(cols)].to(self.device)
        return {r: self.sae.encode(acts) if r == "sae" else acts.float() for r in readouts}

    def _prefix(self, prefix: tuple[int, ...]) -> Any:
        """The key/value cache of a shared prefix, or None where a cache cannot serve the hook
        (it reads layer 0's input: no layer runs, nothing is cached, and positions would
        restart at 0). The last few are kept: domains come in turn, and a domain's questions
        can split its last separator token differently."""
        if prefix not in self._prefixes:
            cache = prefix_cache(self.reader, list(prefix))
            self._prefixes[prefix] = cache if cache.get_seq_length() == len(prefix) else None
            while len(self._prefixes) > 4:
                self._prefixes.pop(next(iter(self._prefixes)))
        return self._prefixes[prefix]

    def _check_length(self, n: int) -> None:
        limit = getattr(self.lm.model.config.get_text_config(), "max_position_embeddings", None)
        if limit and n > limit:
            raise UserError(f"an input of {n} tokens is longer than {self.lm.spec}'s {limit} positions; "
                            "lower --max-length, or use fewer or shorter demonstrations")

    def features(self, batch: list[Sequence]) -> torch.Tensor:
        """[sum of counted positions, d_sae] SAE features, in sequence then position order."""
        return self.read(batch)["sae"]

    def batches(self, items: Iterable[Any], total: int | None, desc: str,
                 max_tokens: int | None = None) -> Iterator[tuple[list[int], list[Any]]]:
        """(indices in the input order, items) per forward pass. Items (Sequences or Pairs) are
        cut to the first `max_tokens` counted tokens in input order, then sorted by prefix and
        length and packed up to `batch_tokens` padded tokens, shared prefixes included (and
        `batch_size` items), so that padding is small; what is counted does not depend on
        this layout."""
        listed = _first_tokens(list(items), max_tokens)

        def length(i: int) -> int:
            # A shared prefix counts: each sequence of the batch gets its own copy of the
            # prefix's keys and values, and attends over them.
            x = listed[i]
            return (max(len(x.a.prefix) + len(x.a.ids), len(x.b.prefix) + len(x.b.ids)) if isinstance(x, Pair)
                    else len(x.prefix) + len(x.ids))

        def prefix(i: int) -> tuple[tuple[int, ...], ...]:
            x = listed[i]
            return (x.a.prefix, x.b.prefix) if isinstance(x, Pair) else (x.prefix,)

        order = sorted(range(len(listed)), key=lambda i: (prefix(i), length(i)))
        with tqdm(total=len(listed), desc=desc, unit="ex", disable=None, leave=False) as bar:
            batch: list[int] = []
            for i in order:
                width = max([length(j) for j in batch] + [length(i)])
                full = batch and ((len(batch) + 1) * width > self.batch_tokens
                                  or (self.batch_size is not None and len(batch) >= self.batch_size)
                                  or prefix(i) != prefix(batch[0]))
                if full:
                    yield batch, [listed[j] for j in batch]
                    bar.update(len(batch))
                    batch = []
                batch.append(i)
            if batch:
                yield batch, [listed[j] for j in batch]
                bar.update(len(batch))

    def stats_many(self, seqs: Iterable[Sequence], readouts: tuple[str, ...], total: int | None = None,
                   max_tokens: int | None = None, desc: str = "extract") -> dict[str, FeatureStats]:
        """Stream counted tokens into FeatureStats per readout (first `max_tokens` tokens)."""
        out = {r: FeatureStats.zeros(self.width(r), self.stats_device) for r in readouts}
        for _, batch in self.batches(seqs, total, desc, max_tokens):
            for r, f in self.read(batch, readouts).items():
                out[r].update(f)
        return {r: st.cpu() for r, st in out.items()}

    def stats(self, seqs: Iterable[Sequence], total: int | None = None,
              max_tokens: int | None = None, desc: str = "extract") -> FeatureStats:
        """SAE feature statistics of counted tokens (first `max_tokens` tokens)."""
        return self.stats_many(seqs, ("sae",), total, max_tokens, desc)["sae"]

    def dense(self, seqs: Iterable[Sequence], total: int | None = None,
              max_tokens: int | None = None, desc: str = "extract", readout: str = "sae") -> torch.Tensor:
        """The reference format: features of every counted token, in input order, `[tokens, width]`
        (on the host: the one output that grows with the data)."""
        blocks: dict[int, torch.Tensor] = {}
        for indices, batch in self.batches(seqs, total, desc, max_tokens):
            f = self.read(batch, (readout,))[readout].cpu()
            sizes = [len(s.positions) for s in batch]
            for i, part in zip(indices, torch.split(f, sizes)):
                blocks[i] = part
        return torch.cat([blocks[i] for i in sorted(blocks)]) if blocks else torch.zeros(0, self.width(readout))

    def paired_many(self, pairs: Iterable[Pair], readouts: tuple[str, ...], other: Extractor | None = None,
                    total: int | None = None, max_tokens: int | None = None,
                    desc: str = "extract pairs") -> dict[str, Stats]:
        """Shift statistics over aligned tokens per readout; `other` reads side b (a
        fine-tuned model). Each example's own shift is kept, sparse, for the bootstrap."""
        other = other or self
        acc = {r: _PairedAccumulator(self.width(r), self.stats_device) for r in readouts}
        examples = 0
        for indices, batch in self.batches(pairs, total, desc, max_tokens):
            fa = self.read([p.a for p in batch], readouts)
            fb = other.read([p.b for p in batch], readouts)
            sizes = [len(p.a.positions) for p in batch]
            for r in readouts:
                acc[r].update(fa[r], fb[r], sizes, indices)
            examples = max(examples, max(indices) + 1)
        return {r: acc[r].result(examples) for r in readouts}

    def paired(self, pairs: Iterable[Pair], other: Extractor | None = None, total: int | None = None,
               max_tokens: int | None = None, desc: str = "extract pairs") -> Stats:
        """SAE shift statistics over aligned tokens; `other` reads side b (a fine-tuned model)."""
        return self.paired_many(pairs, ("sae",), other, total, max_tokens, desc)["sae"]

    def index_aligned(self, seqs_a: Iterable[Sequence], seqs_b: Iterable[Sequence],
                      max_tokens: int, total: int | None = None, desc: str = "extract streams") -> Stats:
        """The reference's `paper` shift on two token streams: row t of one against row t of
        the other, t < max_tokens. Streams are consumed in lockstep, so only the rows one
        stream is ahead of the other (at most a batch) are held."""
        a = FeatureStats.zeros(self.sae.d_sae, self.stats_device)
        b = FeatureStats.zeros(self.sae.d_sae, self.stats_device)
        diff = torch.zeros(self.sae.d_sae, dtype=torch.float64, device=self.stats_device)
        # Streams keep their order (row t against row t): fixed-size chunks, not sorted batches.
        size = self.batch_size or 8
        bar = tqdm(total=total, desc=desc, unit="ex", disable=None, leave=False)
        blocks_a = (self.features(x) for x in _chunks((bar.update(1) or s for s in seqs_a), size))
        blocks_b = (self.features(x) for x in _chunks(seqs_b, size))
        empty = torch.zeros(0, self.sae.d_sae, device=self.device)
        buf_a: torch.Tensor | None = empty
        buf_b: torch.Tensor | None = empty
        while a.count < max_tokens and buf_a is not None and buf_b is not None:
            if buf_a.shape[0] == 0:
                buf_a = next(blocks_a, None)
            if buf_b is not None and buf_b.shape[0] == 0:
                buf_b = next(blocks_b, None)
            if buf_a is None or buf_b is None:
                break
            m = min(buf_a.shape[0], buf_b.shape[0], max_tokens - a.count)
            fa, fb = buf_a[:m], buf_b[:m]
            a.update(fa)
            b.update(fb)
            diff += _sq_diff(fa, fb).to(diff.device)
            buf_a, buf_b = buf_a[m:], buf_b[m:]
        bar.close()
        return Stats(a.cpu(), b.cpu(), diff.cpu())


class _PairedAccumulator:
    """Both sides' statistics, sum (f_b - f_a)^2, and each example's own sum, for one readout."""

    def __init__(self, width: int, device: torch.device | str = "cpu"):
        self.a, self.b = FeatureStats.zeros(width, device), FeatureStats.zeros(width, device)
        self.diff = torch.zeros(width, dtype=torch.float64, device=device)
        self.rows: list[torch.Tensor] = []
        self.cols: list[torch.Tensor] = []
        self.vals: list[torch.Tensor] = []

    def update(self, fa: torch.Tensor, fb: torch.Tensor, sizes: list[int], indices: list[int]) -> None:
        """fa, fb: [tokens, width] of a batch whose examples (input indices `indices`) have
        `sizes` counted tokens each, in that order."""
        device = self.diff.device
        fa, fb = fa.to(device), fb.to(device)
        self.a.update(fa)
        self.b.update(fb)
        d = fb - fa
        sq = d * d
        self.diff += sq.sum(0).double()
        owner = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                        torch.tensor(sizes, dtype=torch.long, device=device))
        per = torch.zeros(len(sizes), sq.shape[1], device=device).index_add_(0, owner, sq)
        r, c = per.nonzero(as_tuple=True)
        self.rows.append(torch.tensor(indices, device=device)[r].int())
        self.cols.append(c.int())
        self.vals.append(per[r, c])

    def result(self, examples: int) -> Stats:
        """On the host; per-example entries in input order (example, then feature)."""
        per_example = None
        if self.rows:
            rows, cols, vals = (torch.cat(x).cpu() for x in (self.rows, self.cols, self.vals))
            order = torch.argsort(rows.long() * self.diff.shape[0] + cols.long(), stable=True)
            per_example = (rows[order], cols[order], vals[order])
        return Stats(self.a.cpu(), self.b.cpu(), self.diff.cpu(), per_example=per_example, examples=examples)


def _first_tokens(items: list[Any], max_tokens: int | None) -> list[Any]:
    """The items (Sequences or Pairs) cut to their first `max_tokens` counted tokens, in order:
    later items dropped, the last one's counted positions cut (both sides of a pair)."""
    if max_tokens is None:
        return items
    out: list[Any] = []
    left = max_tokens
    for x in items:
        if left <= 0:
            break
        n = len(x.a.positions) if isinstance(x, Pair) else len(x.positions)
        if n > left:
            if isinstance(x, Pair):
                x = dataclasses.replace(x, a=dataclasses.replace(x.a, positions=x.a.positions[:left]),
                                        b=dataclasses.replace(x.b, positions=x.b.positions[:left]))
            else:
                x = dataclasses.replace(x, positions=x.positions[:left])
            n = left
        out.append(x)
        left -= n
    return out


def shift_stats(engine: Extractor, method: str, examples: list[Example], render: Render,
                demos: int = 2, seed: int = 0, max_length: int | None = None,
                max_tokens: int | None = None, tuned: Extractor | None = None,
                readouts: tuple[str, ...] = ("sae",)) -> dict[str, Stats]:
    """Shift statistics of a training set by one of the three methods (see DESIGN.md), one
    `Stats` per readout. ICL pairs that had to be cut are reported in `meta['truncation']`."""
    tok, n = engine.lm.tokenizer, len(examples)
    if method == "icl":
        report = Truncation()
        out = engine.paired_many(icl_pairs(examples, tok, render, demos, seed, max_length, report),
                                 readouts, None, n, max_tokens, desc="shift (icl)")
        report.check("training example", max_length)
        for stats in out.values():
            stats.meta["truncation"] = asdict(report)
        return out
    if method == "sft":
        if tuned is None:
            raise UserError("the sft shift needs the fine-tuned model (--tuned-model)")
        if tuned.lm.tokenizer.get_vocab() != tok.get_vocab():
            raise UserError(f"{tuned.lm.spec} and {engine.lm.spec} use different tokenizers; the sft "
                            "shift compares the same tokens through both models")
        return engine.paired_many(same_token_pairs(examples, tok, render, max_length), readouts, tuned,
                                  n, max_tokens, desc="shift (sft)")
    if method == "paper":
        if readouts != ("sae",):
            raise UserError("the paper shift reads SAE features only; use --shift icl for raw residuals")
        return {"sae": engine.index_aligned(sequences(examples, tok, render, max_length),
                                            icl_sequences(examples, tok, render, demos, seed, max_length),
                                            max_tokens or 10_000, n)}
    raise UserError(f"unknown shift method {method!r}; use icl, sft or paper")


def domain_shift_stats(engine: Extractor, examples: list[Example], demos: dict[str, tuple[Example, ...]],
                       render: Render, max_length: int | None = None, max_tokens: int | None = None,
                       desc: str = "domain (icl)") -> Stats:
    """STS_ICL's statistics of domain questions: each question with and without its domain's
    demonstrations, aligned on the question's own tokens (SAE features; first `max_tokens`
    aligned tokens, as a domain's single run counts its first `max_tokens`)."""
    report = Truncation()
    stats = engine.paired(domain_icl_pairs(examples, demos, engine.lm.tokenizer, render, max_length,
                                           report), None, len(examples), max_tokens, desc=desc)
    report.check("domain question", max_length, demos_extra=True)
    stats.meta["truncation"] = asdict(report)
    return stats


def _sq_diff(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """sum over rows of (fb - fa)^2: float32 within a block (a few thousand rows, where float32
    is accurate to ~1e-6), float64 across blocks."""
    d = fb - fa
    return (d * d).sum(0).double()


def _whole(s: Sequence) -> Sequence:
    """The sequence with its prefix put back in front."""
    return Sequence(list(s.prefix) + s.ids, [len(s.prefix) + p for p in s.positions])


def _runs(batch: list[Sequence]) -> Iterator[list[Sequence]]:
    """Consecutive sequences sharing one prefix."""
    run: list[Sequence] = []
    for s in batch:
        if run and s.prefix != run[0].prefix:
            yield run
            run = []
        run.append(s)
    if run:
        yield run


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def save_dense(features: torch.Tensor, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(features.float().contiguous(), tmp)


# --- the `sts extract` stage -------------------------------------------------------------

@dataclass
class ExtractConfig:
    """One `sts extract` run. Every rule between fields is checked here, once, when the config
    is built (`__post_init__`): a bad combination fails before anything loads."""

    data: str
    out: Path
    model: str
    sae: str
    format: Format | None = None  # None: pt for a .pt/.pth OUT, stats otherwise
    shift: Method | None = None  # None: one run; else a paired run
    tuned_model: str | None = None
    demos: int = 2
    seed: int = 0
    tokens: Tokens | None = None  # None: response for icl/sft, all otherwise
    chat: bool | None = None  # None: chat template for icl/sft
    with_response: bool | None = None  # None: with the response for shifts
    max_tokens: int | None = None
    max_examples: int | None = None
    max_length: int | None = None
    batch_size: int | None = None
    batch_tokens: int = 4096
    placement: Placement = field(default_factory=Placement)
    responses: Responses = Responses.DATASET
    generation: Generation = field(default_factory=Generation)
    layer: int | None = None
    first_token: bool = True
    readout: Readout = Readout.SAE
    domain_demos: str | None = None
    domain_demos_n: int = 5
    skip_bad_lines: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.shift = None if self.shift in (None, "none") else parse(Method, self.shift, "--shift")
        self.readout = parse(Readout, self.readout, "--readout")
        self.responses = parse(Responses, self.responses, "--responses")
        self.tokens = None if self.tokens is None else parse(Tokens, self.tokens, "--tokens")
        if self.format is None:
            self.format = Format.PT if self.out.suffix.lower() in (".pt", ".pth") else Format.STATS
        self.format = parse(Format, self.format, "--format")
        if self.format is Format.PT and self.shift is not None:
            raise UserError("--format pt writes one run's dense features; drop --shift (extract base "
                            "and shifted runs separately) or write statistics")
        if self.shift is Method.SFT and not self.tuned_model:
            raise UserError("--shift sft needs --tuned-model (the fine-tuned model)")
        if self.domain_demos is not None and self.shift is not Method.ICL:
            raise UserError("--domain-demos pairs each record with its domain's demonstrations: use it "
                            "with --shift icl")
        if self.domain_demos is not None and self.readout is not Readout.SAE:
            raise UserError("--domain-demos statistics are read on SAE features (the icl score); drop --readout raw")
        if not self.first_token and self.shift is Method.PAPER:
            raise UserError("--no-first-token does not apply to --shift paper (index-aligned streams "
                            "count every token, as the reference does)")
        self.placement.resolved()  # a bad device or dtype fails here, in one line

    @property
    def render(self) -> Render:
        """Domain questions with their domain's demonstrations are rendered as `sts predict`
        renders domain questions (plain text, question only, every token); training pairs
        (icl, sft) as chat turns, counting the response."""
        paired = self.shift in (Method.ICL, Method.SFT) and self.domain_demos is None
        return Render(
            chat=paired if self.chat is None else self.chat,
            with_response=(paired or self.shift is Method.PAPER) if self.with_response is None else self.with_response,
            tokens=self.tokens or (Tokens.RESPONSE if paired else Tokens.ALL),
            skip_first=not self.first_token,
        )


def run(cfg: ExtractConfig, command: str = "") -> str:
    """Load, read the features, write cfg.out (statistics or a dense tensor, atomically);
    returns the line that says what was written."""
    from sts.data import domain_demonstrations, load_dataset
    from sts.models import load_model, parse_hook_name
    from sts.saes import check_pairing, load_sae

    dataset = load_dataset(cfg.data, skip_bad_lines=cfg.skip_bad_lines, max_examples=cfg.max_examples)
    render = cfg.render
    sae = load_sae(cfg.sae)
    point = parse_hook_name(sae.hook_name, cfg.layer)
    for spec in filter(None, (cfg.model, cfg.tuned_model if cfg.shift is Method.SFT else None)):
        check_fits(sae, point, spec)
    check_pairing(sae, cfg.model)
    where = cfg.placement
    lm = load_model(cfg.model, where.dtype, where.device, where.device_map)
    engine = Extractor(lm, sae, point, cfg.batch_size, cfg.batch_tokens)
    examples, tok, n = dataset.examples, lm.tokenizer, len(dataset.examples)
    if cfg.responses is Responses.GENERATED:
        from sts.generate import generated_responses

        examples = generated_responses(lm, examples, cfg.generation, cfg.batch_size or 8)
        texts = cfg.out.with_name(cfg.out.name + "." + GENERATED)  # beside the output: what was read
        with atomic_path(texts) as tmp:
            tmp.write_text("".join(json.dumps({"id": e.uid, "prompt": e.prompt, "response": e.response}) + "\n"
                                   for e in examples))
        print(f"wrote {texts}: the model's {n} responses", file=sys.stderr)
    shift = cfg.shift.value if cfg.shift else "none"
    meta: dict[str, Any] = {
        "model": cfg.model, "sae": cfg.sae, "data": cfg.data, "hook": point.name, "shift": shift,
        **cfg.placement.describe(), "render": asdict(render), "examples": n, "readout": cfg.readout.value,
        "demos": cfg.demos if cfg.shift in (Method.ICL, Method.PAPER) else 0, "seed": cfg.seed,
        "responses": cfg.responses.value}
    if cfg.responses is Responses.GENERATED:
        meta["generation"] = {"temperature": cfg.generation.temperature,
                              "max_new_tokens": cfg.generation.max_new_tokens, "seed": cfg.generation.seed}
    if cfg.format is Format.PT:
        feats = engine.dense(sequences(examples, tok, render, cfg.max_length), n, cfg.max_tokens,
                             readout=cfg.readout)
        if feats.shape[0] == 0:
            raise _no_tokens(cfg.data)
        save_dense(feats, cfg.out)
        return f"wrote {cfg.out}: {feats.shape[0]} tokens x {feats.shape[1]} features"
    if cfg.shift is None:
        result = Stats(engine.stats_many(sequences(examples, tok, render, cfg.max_length), (cfg.readout,), n,
                                         cfg.max_tokens)[cfg.readout])
    elif cfg.domain_demos is not None:
        shown, left = domain_demonstrations(dataset.by_domain(), cfg.domain_demos_n, cfg.domain_demos,
                                            cfg.skip_bad_lines)
        questions = [e for exs in left.values() for e in exs]  # a demonstration is never scored
        result = domain_shift_stats(engine, questions, shown.demos, render, cfg.max_length, cfg.max_tokens)
        meta["examples"] = len(questions)
        meta |= {"demos": cfg.domain_demos_n, "domain_demonstrations": shown.describe()}
    else:
        tuned = None
        if cfg.shift is Method.SFT:
            tuned = Extractor(load_model(cfg.tuned_model or "", where.dtype, where.device, where.device_map),
                              sae, point, cfg.batch_size, cfg.batch_tokens)
        result = shift_stats(engine, cfg.shift, examples, render, cfg.demos, cfg.seed, cfg.max_length,
                             cfg.max_tokens, tuned, (cfg.readout,))[cfg.readout]
    if result.a.count == 0:
        raise _no_tokens(cfg.data)
    result.meta = meta | {"tokens": result.a.count} | (
        {"truncation": result.meta["truncation"]} if "truncation" in result.meta else {})
    result.save(cfg.out)
    return f"wrote {cfg.out}: {result.a.count} tokens, {result.a.d_sae} features"


def _no_tokens(data: str) -> UserError:
    return no_tokens(data, "empty records, or no aligned response tokens; check the data, or try --tokens all")
