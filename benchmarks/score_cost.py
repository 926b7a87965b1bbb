"""What each domain score costs to extract, side by side in one run, on the embedded model
and SAE: the single pass over the domain questions (act, sq, and with raw residuals too:
raw-act, raw-sq, cosine), and the icl score's paired pass (each question alone and after m
demonstrations of its domain), with the demonstrations read once per domain through the
key/value cache (what `sts` does) and encoded again for every question (the plain way).

    python benchmarks/score_cost.py [--domains SPEC] [--domain-demos SPEC] [--questions 20] [--m 5]

Defaults: the embedded MMLU, 4 domains x 20 questions, demonstrations = each domain's first m
questions with their answers. `--domain-demos ../shared/data/mmlu_pro_cot_demos.jsonl` with
`--domains ../shared/data/mmlu_pro_test.jsonl` measures MMLU-Pro's chain-of-thought demos.
Each pass runs twice; the best time is reported. Run it alone: the two cores are shared.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sts.data.datasets import domain_demonstrations, load_dataset, select
from sts.data.embedded import default_sae_dir
from sts.data.inputs import ModelInput, Pair, Render, domain_icl_pairs, sequences
from sts.engine import extract as ex
from sts.engine.models import default_model_dir, load_model, parse_hook_name
from sts.engine.saes import load_sae


def timed(fn, repeats: int = 2):  # noqa: ANN001, ANN201 - a benchmark helper
    """The result and the best wall time of `repeats` runs (the first also warms caches)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", default="embedded:mmlu")
    parser.add_argument("--domain-demos", default=None)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--m", type=int, default=5)
    parser.add_argument("--n-domains", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    groups = select(load_dataset(args.domains), args.questions + args.m, per_domain=True).by_domain()
    groups = dict(list(groups.items())[: args.n_domains])
    demos, groups = domain_demonstrations(groups, args.m, args.domain_demos)
    groups = {d: q[: args.questions] for d, q in groups.items()}
    questions = [e for qs in groups.values() for e in qs]
    sae = load_sae(str(default_sae_dir()))
    lm = load_model(str(default_model_dir()))
    engine = ex.Extractor(lm, sae, parse_hook_name(sae.hook_name), args.batch_size)
    render = Render(with_response=False, tokens="all", skip_first=True)
    tok = lm.tokenizer

    single, t_single = timed(lambda: engine.stats(sequences(questions, tok, render, 512)))
    both, t_both = timed(lambda: engine.stats_many(sequences(questions, tok, render, 512), ("sae", "raw")))
    pairs = list(domain_icl_pairs(questions, demos.demos, tok, render, 512))
    shared, t_shared = timed(lambda: engine.paired(iter(pairs)))
    whole = [Pair(p.a, ModelInput(list(p.b.prefix) + p.b.ids, [len(p.b.prefix) + i for i in p.b.positions]))
             for p in pairs]
    plain, t_plain = timed(lambda: engine.paired(iter(whole)))
    gap = float((shared.sum_sq_diff - plain.sum_sq_diff).abs().max() / plain.sum_sq_diff.abs().max())

    demo_tokens = sum(len(p.b.prefix) for p in pairs) / len(pairs)
    q_tokens = single.count / len(questions)
    print(f"{len(groups)} domains x {args.questions} questions ({args.domains}); m = {args.m} demonstrations "
          f"per domain from {demos.source}; {os.cpu_count()} CPUs, batch {args.batch_size}")
    print(f"question tokens (mean) {q_tokens:.0f}; demonstration tokens before each question (mean) "
          f"{demo_tokens:.0f}")
    print(f"{'pass':<52} {'seconds':>8} {'x act':>6}")
    rows = [("act / sq: each question once (SAE)", t_single),
            ("+ raw-act / raw-sq / cosine: same pass, both readouts", t_both),
            ("icl: question alone + after its demonstrations (KV)", t_shared),
            ("icl, demonstrations encoded again for every question", t_plain)]
    for name, seconds in rows:
        print(f"{name:<52} {seconds:8.1f} {seconds / t_single:6.2f}")
    print(f"icl with shared demonstrations / without: {t_shared / t_plain:.2f}x the time "
          f"(max relative difference of the shift sums {gap:.1e})")


if __name__ == "__main__":
    main()
