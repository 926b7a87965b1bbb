"""`sts select`: which examples of a pool to keep for a domain (issue 54).

Each pool example's score for the targets is its term of `grad`: t_i <S g_i, S g_D> summed over the
target domains (t_i its response tokens, g_i its first-step gradient, g_D the target's mean gradient
on the records `sts predict` reads of it; both through the shipped count sketch, folded to `dim`:
`sts.engine.pool`). A set made of the chosen examples has the largest `grad` on the targets that
this first-order term can give (up to the token weighting's denominator, which every subset
shares). The aggregate over a target's records is their mean (the score's own form); LESS takes
the max over the target's records, which needs each record's own side (the embedded domains ship
only their means): which of the two picks better is for the validation (docs/results/select) to
say, and it is not offered before it does.

Rows stream to disk (`RowStore`) and a rerun of the same command resumes; the ranking, the subset
(the pool's own records, untouched) and a CSV of every example's score are then written atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sts import defaults
from sts.engine.settings import FinetuneSpec, Placement
from sts.errors import UserError
from sts.options import option

DIMS = tuple(1 << b for b in range(10, 17))  # divisors of the shipped sketch's 2^16 buckets


@dataclass
class SelectConfig:
    """One `sts select` run; every rule between fields is checked here, before anything loads."""

    train: str = option("", help="the pool: a dataset of training records (the formats sts finetune reads)")
    target: str = option("", help="the domain(s) to choose for, comma-separated (names of --domains)")
    fraction: float | None = option(None, help="keep this fraction of the pool, in (0, 1]")
    count: int | None = option(None, min=1, help="keep this many examples")
    out: Path = option(Path("selected.jsonl"), help="the chosen records, in the pool's own fields (.jsonl or .json); "
                       "beside it OUT.scores.csv: every example's score")
    domains: str = option(defaults.PREDICT_DOMAINS, help="the domains: the embedded MMLU-Pro categories (their "
                          "gradient sides ship), or a dataset of records with reference chains of thought per domain")
    dim: int = option(8192, min=1, help="each example's sketched gradient on disk, in this many float16 numbers "
                      "(a divisor of 65536; 100,000 examples at 8192: 1.6 GB)")
    model: str = option("", help="model (default: the embedded SmolLM2-135M-Instruct)")
    # the selection reads no SAE; a prediction's session pairs one with the model and keys its cache
    # (the shipped domain sides with it), so the same one is named here
    sae: str = option("", help="the model's SAE as sts predict takes it (default: the embedded one); the selection "
                      "reads none, but the shipped and cached gradient sides are keyed by it")
    seed: int = option(defaults.SEED, help="seed (the LoRA adapter's initialisation, the probe records' draw)")
    placement: Placement = field(default_factory=Placement)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.finetune.seed = self.seed
        if not self.train:
            raise UserError("give the pool: --train POOL")
        if not self.targets:
            raise UserError("give the domain(s) to choose for: --target DOMAIN[,DOMAIN]")
        if (self.fraction is None) == (self.count is None):
            raise UserError("give one of --fraction F (a share of the pool) or --count N")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1] (got {self.fraction})")
        if self.dim not in DIMS:
            raise UserError(f"--dim must divide the shipped sketch's 65536 buckets: one of "
                            f"{', '.join(map(str, DIMS))} (got {self.dim})")
        if self.out.suffix not in (".jsonl", ".json"):
            raise UserError(f"--out {self.out}: name a .jsonl or .json file (the chosen records are written so)")
        if self.out.resolve() == Path(self.train.split("#")[0]).resolve():
            raise UserError(f"--out {self.out} is the pool itself: name another file")

    @property
    def targets(self) -> list[str]:
        """--target's domains, each once, in the order given."""
        return list(dict.fromkeys(t.strip() for t in self.target.split(",") if t.strip()))


@dataclass
class Selection:
    """Every pool example's score for the targets, and the chosen ones (positions in the pool)."""

    scores: list[float]  # per pool example (a duplicate carries its first copy's score)
    tokens: list[int]
    duplicate_of: list[int | None]  # an exact duplicate's first copy (it is scored once, never chosen twice)
    chosen: list[int]  # positions, best first
    targets: list[str]
    per_target: dict[str, list[float]] = field(default_factory=dict)


def pool_records(spec: str) -> tuple[Any, list[dict[str, Any]]]:
    """The pool as examples and, for each, its record as the file holds it."""
    from sts.data.datasets import split_selector
    from sts.data.records import example_rows, read_records

    base, wanted, rows = split_selector(spec)
    if wanted is not None or rows is not None:
        raise UserError(f"--train {spec}: give the pool as a whole file (select from it with --target)")
    raw = read_records(base)
    ds, positions = example_rows(raw, base)
    return ds, [raw[i] for i in positions]


def rank(scores: list[float], eligible: list[bool], keep: int) -> list[int]:
    """The `keep` best eligible positions: highest score first, ties by position (stable)."""
    return sorted((i for i, ok in enumerate(eligible) if ok), key=lambda i: (-scores[i], i))[:keep]


def how_many(cfg: SelectConfig, usable: int, why: str = "") -> int:
    """How many to keep of `usable` distinct examples (checked before the passes on the examples with
    a response, and again after them on those that keep a response token within the length)."""
    if cfg.count is not None:
        if cfg.count > usable:
            raise UserError(f"--count {cfg.count} is more than the pool's {usable} distinct usable examples{why}; "
                            "give a smaller --count or a --fraction")
        return cfg.count
    assert cfg.fraction is not None
    return max(1, round(cfg.fraction * usable))


def select(cfg: SelectConfig, progress: Callable[[str], None] = lambda _m: None) -> Selection:
    """Score every pool example for the targets (rows streamed and resumable), then choose."""
    import torch

    from sts.cache import cache_root, key_digest
    from sts.engine.distributed import barrier, join_run, world
    from sts.engine.finetuning import has_response
    from sts.engine.pool import RowStore, fold, stream_rows
    from sts.prediction.config import PredictConfig
    from sts.prediction.extraction import adapted_model, gradient_domain_sides
    from sts.prediction.predict import prepare

    _, progress = join_run(cfg.placement.resolved()[0], progress)
    pool, _records = pool_records(cfg.train)
    first: dict[str, int] = {}
    duplicate_of: list[int | None] = []
    for i, e in enumerate(pool.examples):
        text = json.dumps([e.history, e.prompt, e.response])
        duplicate_of.append(first.setdefault(text, i) if text in first else None)
        first.setdefault(text, i)
    usable = [i for i, e in enumerate(pool.examples) if has_response(e) and duplicate_of[i] is None]
    if not usable:
        raise UserError(f"--train {cfg.train}: no example has a response to train on; give prompt/response records")
    how_many(cfg, len(usable))  # an impossible count fails before any model loads
    from sts.data.datasets import load_dataset

    names = load_dataset(cfg.domains).domains()  # before any model loads: a target that is not there fails now
    missing = [t for t in cfg.targets if t not in names]
    if missing:
        raise UserError(f"--target {', '.join(missing)}: not among the domains of {cfg.domains} ({', '.join(names)})")
    pcfg = PredictConfig(train=cfg.train, domains=cfg.domains, score="grad", model=cfg.model, sae=cfg.sae,
                         seed=cfg.seed,
                         placement=cfg.placement, finetune=cfg.finetune, library="none", calibrate=["none"])
    prepared = prepare(pcfg, train=pool, progress=progress)
    s, pcfg = prepared.session, prepared.cfg
    sides = gradient_domain_sides(pcfg, {t: prepared.domains[t] for t in cfg.targets}, s, progress)
    big = sides.sketch
    if not big or big % cfg.dim:
        raise UserError(f"the target sides are sketched to {big or 'none (exact)'}; --dim must divide it")
    distinct = [pool.examples[i] for i in range(len(pool.examples)) if duplicate_of[i] is None]
    key = s.base_key | {"kind": "select-rows", "pool": hashlib.sha256(json.dumps(
        [[e.history, e.prompt, e.response] for e in distinct]).encode()).hexdigest(),
        "finetune": json.loads(json.dumps(asdict(pcfg.finetune), default=str)), "big": big, "dim": cfg.dim}
    where = cache_root() / "select" / key_digest(key)
    w = world()
    if w.main:  # the main process makes the store; under a launcher the others open it after
        RowStore.open(where, len(distinct), cfg.dim, key)
    barrier(w)
    store = RowStore.open(where, len(distinct), cfg.dim, key)
    progress(f"select: {len(distinct)} distinct examples of {len(pool.examples)}; gradient rows in {store.path} "
             f"({int(store.done().sum())} done before; a rerun of this command resumes)")
    stream_rows(s.engine().lm, adapted_model(s, pcfg), distinct, pcfg.finetune, store, big)
    if not w.main:
        return Selection([], [], duplicate_of, [], cfg.targets)
    missing_rows = int((~store.done()).sum())
    if missing_rows:  # never rank on rows a process did not write
        raise UserError(f"{missing_rows} example(s) of the pool have no gradient row yet: run the same command again "
                        "to compute them")
    folded = torch.stack([fold(sides.domains[t].double(), cfg.dim) for t in cfg.targets])
    tokens = store.tokens()
    products = store.products(folded) * tokens[:, None] / max(1, int(tokens.sum()))
    at = {p: r for r, p in enumerate(i for i, d in enumerate(duplicate_of) if d is None)}  # pool position -> store row
    row = [at[i if d is None else d] for i, d in enumerate(duplicate_of)]  # a duplicate reads its first copy's
    per_target = {t: [float(products[r, j]) for r in row] for j, t in enumerate(cfg.targets)}
    scores = [sum(per_target[t][i] for t in cfg.targets) for i in range(len(pool.examples))]
    tok = [int(tokens[r]) for r in row]
    # a duplicate is never chosen (its first copy stands for it), nor a record that trains on nothing
    eligible = [d is None and tok[i] > 0 for i, d in enumerate(duplicate_of)]
    keep = how_many(cfg, sum(eligible), " (after leaving out the records whose prompt fills the fine-tuning length)")
    chosen = rank(scores, eligible, keep)
    return Selection(scores, tok, duplicate_of, chosen, cfg.targets, per_target)


def write(cfg: SelectConfig, sel: Selection) -> list[Path]:
    """OUT (the chosen records as the pool holds them, in the pool's order) and OUT.scores.csv
    (every example: position, score per target and summed, tokens, chosen, duplicate_of)."""
    import csv
    import io

    from sts.files import atomic_path

    _, records = pool_records(cfg.train)
    chosen = sorted(sel.chosen)
    with atomic_path(cfg.out) as tmp:
        body = [records[i] for i in chosen]
        tmp.write_text(json.dumps(body, indent=1) + "\n" if cfg.out.suffix == ".json"
                       else "".join(json.dumps(r) + "\n" for r in body))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["position", "score", *sel.targets, "tokens", "chosen", "duplicate_of"])
    rank_of = {p: r + 1 for r, p in enumerate(sel.chosen)}
    for i, v in enumerate(sel.scores):
        d = sel.duplicate_of[i]
        w.writerow([i, f"{v:.17g}", *(f"{sel.per_target[t][i]:.17g}" for t in sel.targets), sel.tokens[i],
                    rank_of.get(i, ""), "" if d is None else d])
    csv_path = cfg.out.with_name(cfg.out.name + ".scores.csv")
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buf.getvalue())
    return [cfg.out, csv_path]


def summary(cfg: SelectConfig, sel: Selection, n: int = 5) -> str:
    """The top chosen examples, for the terminal."""
    pool, _ = pool_records(cfg.train)
    from sts.prediction.predict import excerpt

    lines = [f"chose {len(sel.chosen)} of {len(sel.scores)} examples for {', '.join(sel.targets)} "
             f"(score: the example's term of grad on the targets, t_i <S g_i, S g_D> / T, summed)"]
    for r, i in enumerate(sel.chosen[:n]):
        lines.append(f"  {r + 1:>3}. #{i:<6} {sel.scores[i]:>+10.3g}  {excerpt(pool.examples[i].prompt)}")
    return "\n".join(lines)

