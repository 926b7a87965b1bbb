"""Extraction: model inputs (`sts.data.inputs`) -> SAE features -> statistics (`sts.engine.stats`).

Both the shift and the domain score are sums over tokens, so we stream
(count, sum f, sum f^2, firing count, and for paired runs sum (f_b - f_a)^2) per feature and
never hold a `[tokens, d_sae]` matrix: memory is O(batch x d_sae), whatever the dataset size.
The dense `.pt` export of the reference implementation is the one exception, by contract.

Model inputs are `ModelInput`s: token ids plus the positions whose features count. Paired runs
(`Pair`) carry two sequences whose counted positions correspond one to one: the same example
with and without in-context demonstrations (`icl`), or identical tokens read by two models
(`sft`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

import torch
from tqdm.auto import tqdm

from sts.choices import Method
from sts.data.examples import Example
from sts.data.inputs import (
    ModelInput,
    Pair,
    Render,
    Truncation,
    domain_icl_pairs,
    icl_pairs,
    icl_sequences,
    same_token_pairs,
    sequences,
)
from sts.engine.distributed import World, gather, reduce_sum, shard
from sts.engine.models import (
    HookPoint,
    LoadedModel,
    ResidualReader,
    check_layer,
    layer_device,
    model_shape,
    pad_batch,
    prefix_cache,
)
from sts.engine.saes import LoadedSAE, check_width
from sts.engine.stats import ExampleShifts, FeatureStats, PairedStats
from sts.errors import UserError, no_tokens


def check_fits(sae: LoadedSAE, point: HookPoint, model_spec: str) -> None:
    """SAE width vs hidden size and the layer, from the model's config alone: bad pairs fail
    before minutes are spent loading a large model's weights."""
    hidden, n_layers = model_shape(model_spec)
    check_width(sae, hidden, model_spec)
    check_layer(point, n_layers, model_spec)


READOUTS = ("sae", "raw")  # SAE features, or the hooked layer's raw residual dimensions


class Extractor:
    """Reads SAE features (and, on request, the raw residual stream: the paper's baseline)
    of counted tokens, batch by batch, up to the hook point only. One forward pass serves
    every readout asked for. Under several processes (`world`: a launcher's, `sts.engine.distributed`)
    each reads every N-th input and the statistics are reduced, so every process returns the one
    process's answer; the paper's index-aligned streams are read whole by each."""

    def __init__(self, lm: LoadedModel, sae: LoadedSAE, point: HookPoint, batch_size: int | None = None,
                 batch_tokens: int = 4096, world: World | None = None):
        check_width(sae, lm.hidden_size, lm.spec)
        if batch_size is not None and batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
        if batch_tokens < 1:
            raise UserError(f"--batch-tokens must be at least 1 (got {batch_tokens})")
        self.lm, self.sae, self.point = lm, sae, point
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.world = world or World()
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

    def read(self, batch: list[ModelInput], readouts: tuple[str, ...] = ("sae",)) -> dict[str, torch.Tensor]:
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

    def features(self, batch: list[ModelInput]) -> torch.Tensor:
        """[sum of counted positions, d_sae] SAE features, in sequence then position order."""
        return self.read(batch)["sae"]

    def batches(self, items: Iterable[Any], total: int | None, desc: str,
                 max_tokens: int | None = None) -> Iterator[tuple[list[int], list[Any]]]:
        """(indices in the input order, items) per forward pass. Items (Sequences or Pairs) are
        cut to the first `max_tokens` counted tokens in input order, then sorted by prefix and
        length and packed up to `batch_tokens` padded tokens, shared prefixes included (and
        `batch_size` items), so that padding is small; what is counted does not depend on
        this layout. Under several processes this one gets every N-th item of that order (after
        the token budget: the budget is the one process's)."""
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

        if self.world.size > 1:  # an input too long fails in every process, not in its share's alone
            counted = [i for i, x in enumerate(listed) if (x.a.positions if isinstance(x, Pair) else x.positions)]
            if counted:
                self._check_length(max(length(i) for i in counted))
        order = shard(sorted(range(len(listed)), key=lambda i: (prefix(i), length(i))), self.world)
        with tqdm(total=len(order), desc=desc, unit="ex", disable=None, leave=False) as bar:
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

    def stats_many(self, seqs: Iterable[ModelInput], readouts: tuple[str, ...], total: int | None = None,
                   max_tokens: int | None = None, desc: str = "extract") -> dict[str, FeatureStats]:
        """Stream counted tokens into FeatureStats per readout (first `max_tokens` tokens)."""
        out = {r: FeatureStats.zeros(self.width(r), self.stats_device) for r in readouts}
        for _, batch in self.batches(seqs, total, desc, max_tokens):
            for r, f in self.read(batch, readouts).items():
                out[r].update(f)
        return {r: _summed(st, self.world).cpu() for r, st in out.items()}

    def stats(self, seqs: Iterable[ModelInput], total: int | None = None,
              max_tokens: int | None = None, desc: str = "extract") -> FeatureStats:
        """SAE feature statistics of counted tokens (first `max_tokens` tokens)."""
        return self.stats_many(seqs, ("sae",), total, max_tokens, desc)["sae"]

    def dense(self, seqs: Iterable[ModelInput], total: int | None = None,
              max_tokens: int | None = None, desc: str = "extract", readout: str = "sae") -> torch.Tensor:
        """The reference format: features of every counted token, in input order, `[tokens, width]`
        (on the host: the one output that grows with the data)."""
        blocks: dict[int, torch.Tensor] = {}
        for indices, batch in self.batches(seqs, total, desc, max_tokens):
            f = self.read(batch, (readout,))[readout].cpu()
            sizes = [len(s.positions) for s in batch]
            for i, part in zip(indices, torch.split(f, sizes)):
                blocks[i] = part
        blocks = {i: b for part in gather(blocks, self.world) for i, b in part.items()}
        return torch.cat([blocks[i] for i in sorted(blocks)]) if blocks else torch.zeros(0, self.width(readout))

    def example_means(self, seqs: Iterable[ModelInput], readouts: tuple[str, ...], total: int | None = None,
                      desc: str = "extract") -> tuple[dict[str, torch.Tensor], list[int]]:
        """(readout -> [examples, width] mean over each sequence's counted tokens (0 where none),
        the counted tokens of each), in input order, on the host."""
        listed = list(seqs)
        out = {r: torch.zeros(len(listed), self.width(r)) for r in readouts}
        counts = [len(s.positions) for s in listed]
        for indices, batch in self.batches(listed, total, desc):
            sizes = [len(s.positions) for s in batch]
            for r, f in self.read(batch, readouts).items():
                for i, part in zip(indices, torch.split(f.float().cpu(), sizes)):
                    if part.shape[0]:
                        out[r][i] = part.mean(0)
        reduce_sum(list(out.values()), self.world)  # each row is one process's
        return out, counts

    def paired_many(self, pairs: Iterable[Pair], readouts: tuple[str, ...], other: Extractor | None = None,
                    total: int | None = None, max_tokens: int | None = None,
                    desc: str = "extract pairs") -> dict[str, PairedStats]:
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
        examples = max(gather(examples, self.world))
        return {r: acc[r].combined(self.world).result(examples) for r in readouts}

    def paired(self, pairs: Iterable[Pair], other: Extractor | None = None, total: int | None = None,
               max_tokens: int | None = None, desc: str = "extract pairs") -> PairedStats:
        """SAE shift statistics over aligned tokens; `other` reads side b (a fine-tuned model)."""
        return self.paired_many(pairs, ("sae",), other, total, max_tokens, desc)["sae"]

    def index_aligned(self, seqs_a: Iterable[ModelInput], seqs_b: Iterable[ModelInput],
                      max_tokens: int, total: int | None = None, desc: str = "extract streams") -> PairedStats:
        """The reference's `paper` shift on two token streams: row t of one against row t of
        the other, t < max_tokens. Streams are consumed in lockstep, so only the rows one
        stream is ahead of the other (at most a batch) are held."""
        a = FeatureStats.zeros(self.sae.d_sae, self.stats_device)
        b = FeatureStats.zeros(self.sae.d_sae, self.stats_device)
        diff = torch.zeros(self.sae.d_sae, dtype=torch.float64, device=self.stats_device)
        # Streams keep their order (row t against row t): fixed-size chunks, not sorted batches.
        size = self.batch_size or 8
        bar = tqdm(total=total, desc=desc, unit="ex", disable=None, leave=False)
        blocks_a = (self.features(x) for x in chunks((bar.update(1) or s for s in seqs_a), size))
        blocks_b = (self.features(x) for x in chunks(seqs_b, size))
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
        return PairedStats(a.cpu(), b.cpu(), diff.cpu())


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

    def combined(self, w: World) -> _PairedAccumulator:
        """Every process's sums reduced and example entries gathered (rows keep their input
        indices), in place; one process's accumulator as it is."""
        if w.size > 1:
            _summed(self.a, w)
            _summed(self.b, w)
            reduce_sum([self.diff], w)
            mine = [torch.cat(x).cpu() for x in (self.rows, self.cols, self.vals)] if self.rows else []
            parts = [p for p in gather(mine, w) if p]  # a process may have read none
            self.rows, self.cols, self.vals = ([p[k] for p in parts] for k in range(3))
        return self

    def result(self, examples: int) -> PairedStats:
        """On the host; per-example entries in input order (example, then feature)."""
        per_example = None
        if self.rows:
            rows, cols, vals = (torch.cat(x).cpu() for x in (self.rows, self.cols, self.vals))
            order = torch.argsort(rows.long() * self.diff.shape[0] + cols.long(), stable=True)
            per_example = ExampleShifts(rows[order], cols[order], vals[order], examples)
        return PairedStats(self.a.cpu(), self.b.cpu(), self.diff.cpu(), per_example=per_example)


def _summed(st: FeatureStats, w: World) -> FeatureStats:
    """`st` summed over the processes, in place (one process's as it is)."""
    if w.size > 1:
        count = torch.tensor([st.count], dtype=torch.int64, device=st.sum.device)
        reduce_sum([count, st.sum, st.sum_sq, st.fires], w)
        st.count = int(count[0])
    return st


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
                readouts: tuple[str, ...] = ("sae",), own: list[Example] | None = None) -> dict[str, PairedStats]:
    """Shift statistics of a training set by one of the methods (see DESIGN.md and `Method`),
    one `Stats` per readout. ICL pairs that had to be cut are reported in `meta['truncation']`.
    `own`: the same prompts with the base model's own responses (the data shift)."""
    tok, n = engine.lm.tokenizer, len(examples)
    if method == "data":
        if own is None:
            raise UserError("the data shift needs the base model's own responses to the training prompts")
        return data_shift_stats(engine, own, examples, render, max_length, readouts)
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
    raise UserError(f"unknown shift method {method!r}; use {', '.join(Method)}")


def data_shift_stats(engine: Extractor, own: list[Example], data: list[Example], render: Render,
                     max_length: int | None = None, readouts: tuple[str, ...] = ("sae",)) -> dict[str, PairedStats]:
    """The data-derived shift (persona vectors' recipe, arXiv 2507.21509): for each training
    prompt, the mean features over the training response's tokens (side b, teacher-forced) and
    over the base model's own response's tokens (side a). The two responses differ in tokens,
    so they are aligned per example, not per token: each side's statistics count one row per
    example (its mean), sum_sq_diff is sum_i (b_i - a_i)^2, and each example's own term is
    kept for the bootstrap. An example either of whose responses counts no token is left out."""
    tok = engine.lm.tokenizer
    a = engine.example_means(sequences(own, tok, render, max_length), readouts, len(own), "data shift (own)")
    b = engine.example_means(sequences(data, tok, render, max_length), readouts, len(data), "data shift (data)")
    keep = [i for i in range(min(len(own), len(data))) if a[1][i] and b[1][i]]
    if not keep:
        raise no_tokens("the training set", "no example has a response token on both sides; check its responses")
    out = {}
    for r in readouts:
        acc = _PairedAccumulator(engine.width(r))
        acc.update(a[0][r][keep], b[0][r][keep], [1] * len(keep), keep)
        out[r] = acc.result(max(keep) + 1)
        out[r].meta["examples_aligned"] = len(keep)
    return out


def domain_shift_stats(engine: Extractor, examples: list[Example], demos: dict[str, tuple[Example, ...]],
                       render: Render, max_length: int | None = None, max_tokens: int | None = None,
                       desc: str = "domain (icl)") -> PairedStats:
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


def _whole(s: ModelInput) -> ModelInput:
    """The sequence with its prefix put back in front."""
    return ModelInput(list(s.prefix) + s.ids, [len(s.prefix) + p for p in s.positions])


def _runs(batch: list[ModelInput]) -> Iterator[list[ModelInput]]:
    """Consecutive sequences sharing one prefix."""
    run: list[ModelInput] = []
    for s in batch:
        if run and s.prefix != run[0].prefix:
            yield run
            run = []
        run.append(s)
    if run:
        yield run


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
