"""Each example of a pool's sketched gradient, streamed to disk (`sts select`).

`grad`'s training side keeps its rows in memory (`gradients.PerExample`), which serves one set of
hundreds. A pool of 100,000 examples needs them on disk: `RowStore` holds the rows as a float16
memory map ([examples, dim]: 1.6 GB at 8,192 dimensions), each example's response tokens, and a
done flag per example that is set only after its row is flushed, so a run killed at any moment
(`kill -9` included) resumes losing at most the examples in flight. Each row is stored divided by its
largest magnitude (its scale kept in float32), so float16 keeps its precision at any gradient scale.
Memory stays flat as the pool grows: nothing but the batch in flight is held.

The rows are the shipped count sketch (`gradients.sketch`, 2^16 buckets) folded to `dim`
(`fold`): bucket b of the small sketch sums buckets b, b + dim, b + 2 dim, ... of the large one,
which is itself a count sketch (hash h mod dim, the same signs), so the shipped domain sides fold
to the same space and every inner product stays an unbiased estimate of the exact one. Why not
numpy's or torch's own memmap-backed dataset tools: neither writes a resumable, flag-guarded store.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sts.data.examples import Example
from sts.engine.settings import FinetuneSpec

# the store's files: name, dtype, whether a row has `dim` numbers (else one number an example)
FILES = (("rows.f16", np.float16, True), ("scale.f32", np.float32, False), ("tokens.i64", np.int64, False),
         ("done.u8", np.uint8, False))


def fold(x: torch.Tensor, dim: int) -> torch.Tensor:
    """A count sketch (last axis of size D) folded to `dim` buckets (dim divides D)."""
    big = x.shape[-1]
    if big % dim:
        raise ValueError(f"a sketch of {big} buckets folds only to a divisor of {big} (got {dim})")
    return x.reshape(*x.shape[:-1], big // dim, dim).sum(-2)


@dataclass
class RowStore:
    """rows.f16 ([n, dim] float16), scale.f32, tokens.i64 and done.u8 ([n] each) under `path`, with
    meta.json naming what they were computed from (`key`): a store of another key is refused."""

    path: Path
    n: int
    dim: int

    @classmethod
    def open(cls, path: Path, n: int, dim: int, key: dict[str, Any]) -> RowStore:
        """The store at `path`, made if absent. One whose meta.json names another pool, model or
        dimension, or whose files cannot be read, is refused in one line (remove it to start over)."""
        from sts.errors import UserError

        path.mkdir(parents=True, exist_ok=True)
        meta = path / "meta.json"
        want = {"n": n, "dim": dim, "key": key}
        if meta.is_file():
            try:
                same = json.loads(meta.read_text()) == json.loads(json.dumps(want))
                readable = all((path / f"{name}.npy").is_file() for name, _, _ in FILES)
            except ValueError:
                same = readable = False
            if not same or not readable:
                raise UserError(f"{path} holds rows of another pool, model or --dim, or is damaged: remove that "
                                "folder and run again")
        else:
            for name, dtype, shape in ((name, dtype, (n, dim) if width else (n,)) for name, dtype, width in FILES):
                np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps(want))
            tmp.replace(meta)  # the store exists once its files do
        return cls(path, n, dim)

    def _map(self, name: str) -> np.memmap:
        return np.load(self.path / f"{name}.npy", mmap_mode="r+")

    def done(self) -> np.ndarray:
        return np.array(self._map("done.u8"), dtype=bool)

    def write(self, rows: list[int], values: torch.Tensor, tokens: list[int]) -> None:
        """Rows first, flushed; then their done flags (a kill between the two recomputes them). Each
        row is stored divided by its largest magnitude (kept in float32 beside it), so float16 keeps
        its relative precision whatever the gradients' scale; a row that is not finite is refused."""
        if not torch.isfinite(values).all():
            raise ValueError("an example's gradient is not finite (inf or nan): check the model's dtype and data")
        scale = values.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny).to(torch.float32)
        r, t, sc = self._map("rows.f16"), self._map("tokens.i64"), self._map("scale.f32")
        r[rows] = (values / scale[:, None].to(values.dtype)).to(torch.float16).numpy()
        t[rows] = tokens
        sc[rows] = scale.numpy()
        for m in (r, t, sc):
            m.flush()
        d = self._map("done.u8")
        d[rows] = 1
        d.flush()

    def tokens(self) -> np.ndarray:
        return np.array(self._map("tokens.i64"))

    def products(self, sides: torch.Tensor, chunk: int = 4096) -> np.ndarray:
        """[n, domains] <row_i, side_D> in float64, read `chunk` rows at a time (flat memory)."""
        r = np.load(self.path / "rows.f16.npy", mmap_mode="r")
        scale = np.load(self.path / "scale.f32.npy").astype(np.float64)
        s = sides.double().numpy().T
        out = np.empty((self.n, s.shape[1]))
        for a in range(0, self.n, chunk):
            out[a:a + chunk] = (r[a:a + chunk].astype(np.float64) @ s) * scale[a:a + chunk, None]
        return out

    def row(self, i: int) -> np.ndarray:
        """Example i's stored row, scale restored (float64)."""
        return np.load(self.path / "rows.f16.npy", mmap_mode="r")[i].astype(np.float64) * float(
            np.load(self.path / "scale.f32.npy")[i])


def stream_rows(lm: Any, model: Any, examples: list[Example], spec: FinetuneSpec, store: RowStore, big: int,
                batch_tokens: int | None = None) -> None:
    """Every not-yet-done example's sketched gradient (`big` buckets, folded to the store's dim),
    written to `store` batch by batch; under several processes each takes its share of the
    examples. A record with no response token in the fitted length gets a zero row and 0 tokens."""
    from tqdm.auto import tqdm

    from sts.engine.distributed import barrier, shard, world
    from sts.engine.gradients import TRAIN_BATCH_TOKENS, PerExample, _batches, _loss, indexed_training_items
    from sts.engine.models import input_device
    from sts.engine.per_example import PerExampleGrads

    w = world()
    done = store.done()
    barrier(w)  # every process has read the same flags before any is set: the shares agree
    indexed = indexed_training_items(lm, examples, spec)
    kept = {pos for pos, _ in indexed}
    empty = [i for i in range(len(examples)) if i not in kept and not done[i]]
    if empty and w.main:
        store.write(empty, torch.zeros(len(empty), store.dim), [0] * len(empty))
    row_of = {id(item): pos for pos, item in indexed}
    todo = shard(sorted((item for pos, item in indexed if not done[pos]), key=lambda it: len(it[0])), w)
    params = [p for p in model.parameters() if p.requires_grad]
    device, pad = input_device(model), int(lm.tokenizer.pad_token_id or 0)
    if batch_tokens is None:
        batch_tokens = TRAIN_BATCH_TOKENS.get(device.type, TRAIN_BATCH_TOKENS["cuda"])
    keep = PerExample(dim=big)
    hooks = PerExampleGrads(model, params)
    try:
        with tqdm(total=sum(len(seq) for seq, _ in todo), desc=f"gradients ({int(done.sum())} of {len(examples)} "
                  "done before)", unit="tok", unit_scale=True, file=sys.stderr, disable=not w.main) as bar:
            for batch in _batches(todo, batch_tokens):
                model.zero_grad(set_to_none=True)
                _loss(model, batch, [1.0] * len(batch), device, pad).backward()
                rows = fold(keep.take(hooks.flat().double()), store.dim)
                store.write([row_of[id(it)] for it in batch], rows, [len(seq) - start for seq, start in batch])
                bar.update(sum(len(seq) for seq, _ in batch))
    finally:
        hooks.remove()
        model.zero_grad(set_to_none=True)
    barrier(w)
