"""The plan line: what a prediction will compute and its CPU time, estimated before it starts.
"""

from __future__ import annotations

import torch

from sts.data.examples import Dataset, Example, unsealed
from sts.prediction.config import PredictConfig
from sts.prediction.extraction import explained, gradient_records, gradient_train, needs, with_explanation
from sts.prediction.session import (
    Session,
    domain_key,
    generated_key,
    gradient_domain_cached,
    gradient_train_cached,
    gradient_train_key,
    lookahead_key,
    shift_key,
)
from sts.scores.score import spec_of

# Tokens per second of a forward pass to the hooked layer on one CPU thread, measured where the
# plan line matters most: the embedded default's cold run (icl pairs of ~830 tokens with their
# demonstrations, SmolLM2-135M to layer 22) read 97k tokens in 268 s on 2 threads
# (benchmarks/predict_speed.py, 2026-11-30). Short sequences read faster (~450 a thread:
# benchmarks/extract_speed.py), so the plan line says "about" and errs long for them.
CPU_TOKENS_PER_THREAD_S = 180


# The domain side's backward passes, in padded batches, on the same machine
# (benchmarks/gradient_speed.py --only domain --records 20, 2026-12-04): 14 x 20 reference chains
# of thought, 102,996 tokens, in 844 s on 2 threads: ~61 tokens/s a thread.
CPU_BACKWARD_TOKENS_PER_THREAD_S = 60
# The training side, one example a pass through the per-example hooks (benchmarks/gradient_speed.py
# --only training, 2026-12-03): a user's own 100 examples, 26,023 tokens, in 194-205 s on 2 threads,
# ~65 tokens/s a thread, as fast as a bare forward + backward of the same tokens.
CPU_TRAINING_BACKWARD_TOKENS_PER_THREAD_S = 65


def plan(cfg: PredictConfig, sets: dict[str, Dataset], domains: dict[str, list[Example]], session: Session) -> str:
    """One line saying what this prediction will compute and roughly how long it will take,
    from the token count of what is not cached."""
    needed, domain_readouts, _pairs, _texts = needs((cfg.score,))
    readouts = with_explanation(cfg, (cfg.score,), needed)

    def shift_missing(ds: Dataset) -> bool:
        return bool(readouts) and not all(session.cache.has(shift_key(session, cfg, ds) | {"readout": r})
                                          for r in readouts)

    count = session.token_counter()
    tokens, todo = 0, []
    backward = 0  # tokens of the gradient scores' backward passes (slower per token than a forward)
    train_backward = 0  # ... of the training side's, one example a pass
    records = gradient_records(cfg, domains)  # what the gradient and lookahead sides read
    if spec_of(cfg.score).reads("gradients"):
        train_missing = [(spec, g) for spec, ds in sets.items()
                         if not gradient_train_cached(session, cfg, g := gradient_train(cfg, ds), records)]
        grad_domains = [d for d, exs in records.items() if not gradient_domain_cached(session, cfg, d, exs)]
        for spec, ds in train_missing:
            train_backward += sum(count(e.prompt + (e.response or "")) for e in ds.examples)
            todo.append(f"the gradients of {len(ds.examples)} examples of {spec}")
        unsealed((e for d in grad_domains for e in records[d]),
                 f"the gradient side of domain(s) {', '.join(grad_domains)} under these settings")
        backward += sum(count(e.prompt + (e.cot or "")) for d in grad_domains for e in records[d])
        if grad_domains:
            todo.append(f"the gradients of {len(grad_domains)} of {len(domains)} domains "
                        f"(at most {cfg.probe_records} records each: --probe-records)")
    if spec_of(cfg.score).reads("lookahead"):
        more, todo_ahead = _lookahead_plan(cfg, sets, records, session)
        backward += more
        todo += todo_ahead
    for spec, ds in sets.items():
        ds = ds if needed else explained(cfg, ds)  # only the explanation reads the shift: its subset
        if shift_missing(ds):
            sides = 2 + cfg.demos if cfg.method == "icl" else 2  # an icl pair: the example twice, its demos once
            tokens += sides * sum(count(e.prompt + (e.response or "")) for e in ds.examples)
            todo.append(f"the shift of {len(ds.examples)} examples of {spec}")
    missing = [d for d, exs in domains.items()
               if domain_readouts and not all(session.cache.has(domain_key(session, cfg, exs) | {"readout": r})
                                              for r in domain_readouts)]
    unsealed((e for d in missing for e in domains[d]), f"reading domain(s) {', '.join(missing)} under these settings")
    tokens += sum(count(e.prompt) for d in missing for e in domains[d])
    if missing:
        todo.append(f"{len(missing)} of {len(domains)} domains")
    if not todo:
        return "every statistic this prediction needs is cached (or shipped): no model pass"
    threads, w = torch.get_num_threads(), session.world
    where = cfg.placement.describe()
    # the processes share the model passes (`sts.engine.distributed`)
    seconds = (tokens / (CPU_TOKENS_PER_THREAD_S * threads * w.size)
               + backward / (CPU_BACKWARD_TOKENS_PER_THREAD_S * threads * w.size)
               + train_backward / (CPU_TRAINING_BACKWARD_TOKENS_PER_THREAD_S * threads * w.size))
    tokens += backward + train_backward
    on = f"{threads} CPU threads" + (f" in each of {w.describe()}" if w.size > 1 else "")
    eta = (f"about {max(1, round(seconds / 60))} min on {on}" if where["device"] == "cpu"
           else f"on {where['device']}: well under the CPU's {max(1, round(seconds / 60))} min")
    generates = (cfg.method == "data" or cfg.responses == "generated") and not all(
        session.cache.has(generated_key(session, cfg, ds), ".json") for ds in sets.values())
    extra = ", plus generating the model's own responses" if generates else ""
    return f"to compute: {'; '.join(todo)} (~{tokens // 1000}k tokens; {eta}{extra})"


def _lookahead_plan(cfg: PredictConfig, sets: dict[str, Dataset], domains: dict[str, list[Example]],
                    session: Session) -> tuple[int, list[str]]:
    """(backward-pass tokens, what to compute) of a lookahead score: the run's steps (a step of
    `batch_size` examples counted as a backward pass over them), the training gradient (line),
    the domains' gradient sides (look-fo) or two forward passes over their records (line, look)."""
    count = session.token_counter()
    direction = spec_of(cfg.score).direction
    tokens, todo = 0, []
    for spec, ds in sets.items():
        per_example = sum(count(e.prompt + (e.response or "")) for e in ds.examples) / max(1, len(ds.examples))
        if direction == "line":
            g = gradient_train(cfg, ds)
            if not session.cache.has(gradient_train_key(session, cfg, g)):
                tokens += int(per_example * len(g.examples))
                todo.append(f"the gradients of {len(g.examples)} examples of {spec}")
        elif not session.cache.has(lookahead_key(session, cfg, ds)):
            tokens += int(per_example * cfg.steps * cfg.finetune.batch_size * cfg.finetune.grad_accum)
            todo.append(f"{cfg.steps} optimizer steps of the fine-tuning run on {spec}")
    if direction == "look-fo":
        missing = [d for d, exs in domains.items() if not gradient_domain_cached(session, cfg, d, exs)]
        tokens += sum(count(e.prompt + (e.cot or "")) for d in missing for e in domains[d])
        if missing:
            todo.append(f"the gradients of {len(missing)} of {len(domains)} domains")
    else:  # a forward pass is about a third of a backward one
        tokens += 2 * len(sets) * sum(count(e.prompt + (e.cot or "")) for q in domains.values() for e in q) // 3
        todo.append(f"each domain's loss at the start and {cfg.steps} steps out")
    return tokens, todo
