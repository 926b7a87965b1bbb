"""Tokens per second of the gradient scores' two sides against a bare torch forward + backward of the
same model, the same LoRA adapter and the same token batches, side by side in one run (issue 41's
target: each side within 1.3x of the bare pass's time), with each measurement's peak memory (each
runs in a child process of its own, so its peak resident size is its own).

- training side: a user's own 100 examples (CHAMP's problems 101-200; nothing of them shipped),
  batched with per-example gradients (`gradients.training_gradients`), beside the one-example-a-pass
  loop it replaced;
- domain side: 14 MMLU-Pro categories x 20 reference chains of thought (../shared/data; skipped
  when absent), in padded batches (`gradients.domain_gradients`), beside the bare pass with the LM
  head on every position (before the loss kept only the scored positions' logits).

    python benchmarks/gradient_speed.py [--examples 100] [--records 20] [--batch-tokens N] [--only training]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _setup(examples: int, records: int) -> tuple[Any, Any, Any, list[Any], dict[str, list[Any]]]:
    from sts.data.datasets import load_dataset
    from sts.engine.gradients import adapted
    from sts.engine.models import default_model_dir, load_model
    from sts.engine.settings import FinetuneSpec

    lm = load_model(str(default_model_dir()))
    spec = FinetuneSpec()
    train = load_dataset(f"embedded:champ#rows=100:{100 + examples}").examples
    domains: dict[str, list[Any]] = {}
    if SHARED.is_dir():
        for name in ("mmlu_pro_cot_train.jsonl", "mmlu_pro_cot_refs.jsonl"):
            for d, q in load_dataset(str(SHARED / name)).by_domain().items():
                domains[d] = q[-records:]  # the last records: no committed run read them first
    return lm, spec, adapted(lm, spec), train, domains


def _bare(lm: Any, model: Any, items: list[tuple[list[int], int]], batch_tokens: int) -> None:
    """A forward and a backward pass of the same batches, nothing else."""
    from sts.engine.gradients import _batches, _loss
    from sts.engine.models import input_device

    device, pad = input_device(model), int(lm.tokenizer.pad_token_id or 0)
    for batch in _batches(sorted(items, key=lambda it: len(it[0])), batch_tokens):
        model.zero_grad(set_to_none=True)
        _loss(model, batch, [1.0] * len(batch), device, pad).backward()


def _bare_full_head(lm: Any, model: Any, items: list[tuple[list[int], int]], batch_tokens: int) -> None:
    """The bare pass with the LM head on every position (what `_loss` ran before it kept only the
    scored positions' logits): the model behind a forward that takes no `logits_to_keep`, so that
    `_loss` takes its fallback, the head everywhere."""
    import torch

    class WholeHead(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self) -> Any:
            return self.inner.get_input_embeddings()

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    _bare(lm, WholeHead(model), items, batch_tokens)


def _loop(lm: Any, model: Any, items: list[tuple[list[int], int]]) -> None:
    """The training side before batching: one backward pass per example."""
    from sts.engine.gradients import _flat_grad, _loss
    from sts.engine.models import input_device

    params = [p for p in model.parameters() if p.requires_grad]
    device, pad = input_device(model), int(lm.tokenizer.pad_token_id or 0)
    for seq, start in items:
        model.zero_grad(set_to_none=True)
        _loss(model, [(seq, start)], [1.0], device, pad).backward()
        _flat_grad(params)


def _measure(what: str, examples: int, records: int, batch_tokens: int | None, out: Any) -> None:
    import torch

    from sts.engine.gradients import (
        DOMAIN_BATCH_TOKENS,
        TRAIN_BATCH_TOKENS,
        domain_gradients,
        domain_items,
        training_gradients,
        training_items,
    )

    torch.manual_seed(0)
    lm, spec, model, train, domains = _setup(examples, records)
    device = next(model.parameters()).device.type
    train_tokens = batch_tokens or TRAIN_BATCH_TOKENS.get(device, TRAIN_BATCH_TOKENS["cuda"])
    domain_tokens = batch_tokens or DOMAIN_BATCH_TOKENS
    t_items = training_items(lm, train, spec)
    d_items = [it for q in domains.values() for it in domain_items(lm, q)]
    jobs = {"training side": (lambda: training_gradients(lm, model, train, spec, train_tokens), t_items),
            "training side, one example a pass": (lambda: _loop(lm, model, t_items), t_items),
            "bare pass (training batches)": (lambda: _bare(lm, model, t_items, train_tokens), t_items),
            "domain side": (lambda: domain_gradients(lm, model, domains, domain_tokens), d_items),
            "bare pass (domain batches)": (lambda: _bare(lm, model, d_items, domain_tokens), d_items),
            "bare pass, LM head on every position": (lambda: _bare_full_head(lm, model, d_items, domain_tokens),
                                                     d_items)}
    run, items = jobs[what]
    if not items:
        out.put((what, 0, 0.0, 0))
        return
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    out.put((what, sum(len(ids) for ids, _ in items), seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="padded tokens a pass (default: the training side's own, by device)")
    parser.add_argument("--only", choices=("training", "domain"), default=None, help="measure one side only")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    sides = {"training": ("bare pass (training batches)", "training side", "training side, one example a pass"),
             "domain": ("bare pass (domain batches)", "bare pass, LM head on every position", "domain side")}
    for what in [w for side, names in sides.items() if args.only in (None, side) for w in names]:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(what, args.examples, args.records, args.batch_tokens, queue))
        proc.start()
        name, tokens, seconds, peak_kb = queue.get()
        proc.join()
        results[name] = (tokens, seconds, peak_kb)
        print(f"{name:36s} {tokens:>8,} tokens {seconds:7.1f} s {tokens / max(seconds, 1e-9):7.0f} tok/s "
              f"peak {peak_kb / 1024:6.0f} MB", flush=True)
    print(f"\n{args.examples} training examples, {args.records} reference records a domain, "
          f"{args.batch_tokens or 'the default'} padded tokens a batch")
    print("| side | seconds | tokens/s | peak MB | / bare pass |\n|---|---|---|---|---|")
    for name, bare in (("training side", "bare pass (training batches)"),
                       ("training side, one example a pass", "bare pass (training batches)"),
                       ("domain side", "bare pass (domain batches)"),
                       ("bare pass, LM head on every position", "bare pass (domain batches)")):
        tokens, seconds, peak = results.get(name, (0, 0.0, 0))
        if tokens:
            print(f"| {name} | {seconds:.0f} | {tokens / seconds:.0f} | {peak / 1024:.0f} | "
                  f"{seconds / results[bare][1]:.2f} |")


if __name__ == "__main__":
    main()
