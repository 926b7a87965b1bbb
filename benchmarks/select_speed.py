"""`sts select`'s gradient rows against a bare torch forward + backward of the same model, adapter and
token batches, side by side in one run (issue 54's target: at least 0.9x the bare pass's tokens per
second), with each measurement's peak memory (each runs in a child process of its own) and the
store's size on disk.

The pool: the selection round's (`experiments/select/pool.py`, out/select/pool.jsonl) where it was
built, else CHAMP's problems 100-270 (embedded); its first `--examples`.

    python benchmarks/select_speed.py [--examples 100] [--dim 8192] [--repeats 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT / "out" / "select" / "pool.jsonl"


def _setup(examples: int) -> tuple[Any, Any, Any, list[Any]]:
    from sts.data.datasets import load_dataset
    from sts.engine.gradients import adapted
    from sts.engine.models import default_model_dir, load_model
    from sts.engine.settings import FinetuneSpec

    lm = load_model(str(default_model_dir()))
    spec = FinetuneSpec()
    spec_name = str(POOL) if POOL.is_file() else "embedded:champ#rows=100:270"
    return lm, spec, adapted(lm, spec), load_dataset(spec_name).examples[:examples]


def _measure(what: str, examples: int, dim: int, out: Any) -> None:
    from sts.engine.gradients import TRAIN_BATCH_TOKENS, _batches, _loss, training_items
    from sts.engine.models import input_device
    from sts.engine.pool import RowStore, stream_rows

    lm, spec, model, train = _setup(examples)
    items = training_items(lm, train, spec)
    tokens = sum(len(ids) for ids, _ in items)
    started = time.perf_counter()
    if what == "bare":  # the same batches (one example a pass on the CPU), nothing else
        device, pad = input_device(model), int(lm.tokenizer.pad_token_id or 0)
        for batch in _batches(sorted(items, key=lambda it: len(it[0])), TRAIN_BATCH_TOKENS[device.type]):
            model.zero_grad(set_to_none=True)
            _loss(model, batch, [1.0] * len(batch), device, pad).backward()
        size = 0
    else:
        with tempfile.TemporaryDirectory() as tmp:
            store = RowStore.open(Path(tmp) / "rows", len(train), dim, {"benchmark": True})
            stream_rows(lm, model, train, spec, store, 1 << 16)
            size = sum(p.stat().st_size for p in Path(tmp, "rows").iterdir())
    seconds = time.perf_counter() - started
    out.put({"what": what, "seconds": seconds, "tokens": tokens, "peak_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "bytes": size})


def run(what: str, examples: int, dim: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(what, examples, dim, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows: dict[str, list[dict[str, Any]]] = {"bare": [], "rows": []}
    for _ in range(args.repeats):  # interleaved: a load that comes and goes falls on both
        for what in rows:
            rows[what].append(run(what, args.examples, args.dim))
    best = {w: min(r, key=lambda x: x["seconds"]) for w, r in rows.items()}
    print(f"{args.examples} examples, {best['bare']['tokens']:,} tokens, best of {args.repeats} runs each:")
    for w, r in best.items():
        print(f"  {w:<5} {r['seconds']:8.1f} s  {r['tokens'] / r['seconds']:8.1f} tok/s  peak {r['peak_mb']:7.0f} MB"
              + (f"  store {r['bytes'] / 1e6:.1f} MB" if r["bytes"] else ""))
    ratio = (best["rows"]["tokens"] / best["rows"]["seconds"]) / (best["bare"]["tokens"] / best["bare"]["seconds"])
    print(f"rows: {ratio:.2f}x the bare pass's tokens per second (target: at least 0.9x)")


if __name__ == "__main__":
    main()
