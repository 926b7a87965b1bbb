"""Issue 40: every candidate of PREREGISTRATION.md on the round's three new sets and the ten earlier
ones, on the shipped probe records (10 a category, `docs/results/probes`' draw).

    .venv/bin/python docs/results/beyond/candidates.py run       # resumable, set by set
    .venv/bin/python docs/results/beyond/candidates.py analyse   # CANDIDATES.md, frontier.png, analysis.json

`run` writes `candidates.json` (committed): per set, every candidate's scores on the ten measured
categories (the gradient ones exact and through the shipped count sketch) and the seconds each
part took. The exact training sides, the lookahead states and the probe losses stay in the cache
(`$STS_CACHE/beyond`, with the exact domain sides of `$STS_CACHE/probes`), not in git.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
sys.path.insert(0, str(RESULTS / "probes"))
import probes as pr  # noqa: E402  (the shipped probe draw and the ten earlier sets)

D = "../shared/data"
NEW = {"train-1-mmlu-pro-cot-train-engineering": f"{D}/mmlu_pro_cot_train.jsonl#category=engineering",
       "train-2-math500-test-100-200": f"{D}/math500_test.jsonl#rows=100:200",
       "train-3-alpaca-en-demo-100-200": f"{D}/alpaca_en_demo.json#rows=100:200"}  # run.sh
OWN = pr.OWN | {"train-1-mmlu-pro-cot-train-engineering": "engineering", "train-2-math500-test-100-200": "math",
                "train-3-alpaca-en-demo-100-200": None}
EARLIER = {**pr.TRANSFER, **pr.HELDOUT}
MEASURED = ("math", "physics", "other", "psychology", "biology", "business", "engineering", "philosophy",
            "computer science", "history")  # the categories every round evaluates
PROBES = 10  # the shipped count (defaults.PROBE_RECORDS)
LOOK = (2, 5, 10)
LINE = (10, 60)
OUT = HERE / "candidates.json"


def work() -> Path:
    from sts.cache import cache_root

    path = cache_root() / "beyond"
    path.mkdir(parents=True, exist_ok=True)
    return path


def spec() -> Any:
    from sts.finetuning import FinetuneSpec

    return FinetuneSpec(max_steps=60, batch_size=4, seed=0)  # run.sh's recipe


def probe_records() -> dict[str, list[Any]]:
    """Each measured category's shipped probe records: the first PROBES of probes.json's draw."""
    from sts.data import load_dataset

    drawn = json.loads((RESULTS / "probes" / "probes.json").read_text())["probes"]
    by_uid = {e.uid: e for spec_ in (pr.TRAIN_FILE, pr.REFS_FILE) for e in load_dataset(spec_).examples}
    return {d: [by_uid[u] for u in drawn[d][:PROBES]] for d in MEASURED}


def check_disjoint(records: dict[str, list[Any]]) -> None:
    """Stop if a probe record is one this round (or any committed evaluation) measured."""
    used = pr.evaluated_ids()
    clash = [e.uid for q in records.values() for e in q if e.uid in used]
    if clash:
        raise SystemExit(f"probe records {clash[:5]} are evaluated records: the pre-registration's premise fails")


def load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.is_file() else {}


def save(done: dict[str, Any]) -> None:
    from sts.files import atomic_path

    with atomic_path(OUT) as tmp:
        tmp.write_text(json.dumps(done, indent=1) + "\n")


def domain_sides() -> Any:
    """The exact gradient sides of the measured categories on their probe records."""
    from sts.gradients import DomainGradients

    sides = {d: pr.prefix_sides(d, PROBES) for d in MEASURED}
    if any(s is None for s in sides.values()):
        raise SystemExit("the probe chunks are not in the cache: run docs/results/probes/probes.py run first")
    return DomainGradients({d: s[PROBES][0].float() for d, s in sides.items() if s},
                           {d: s[PROBES][1] for d, s in sides.items() if s})


def training_side(lm: Any, name: str, train_spec: str, done: dict[str, Any]) -> Any:
    """The set's exact G and v: the probes experiment's where it computed them, else computed here."""
    from sts.data import load_dataset
    from sts.gradients import TrainingGradients, adapted
    from sts.gradients import training_side as compute

    for path in (pr.work() / f"train-{name}.safetensors", work() / f"train-{name}.safetensors"):
        if path.is_file():
            return TrainingGradients.load(path)
    started = time.perf_counter()
    side = compute(lm, adapted(lm, spec()), load_dataset(train_spec, max_examples=100).examples, spec())
    side.save(work() / f"train-{name}.safetensors")
    done["seconds"][name]["training side"] = round(time.perf_counter() - started, 1)
    return side


def one_set(lm: Any, name: str, train_spec: str, records: dict[str, list[Any]], dom: Any,
            base: dict[str, float], done: dict[str, Any]) -> None:
    from sts.data import load_dataset
    from sts.defaults import GRADIENT_SKETCH
    from sts.gradients import GradientStats, sketch
    from sts.lookahead import Lookahead, drops, line_point, lookahead, moved_losses

    secs = done["seconds"].setdefault(name, {})
    t = training_side(lm, name, train_spec, done)
    exact = GradientStats.join(t, dom)
    sk = GradientStats.join(t.sketched(GRADIENT_SKETCH), dom.sketched(GRADIENT_SKETCH))
    scores: dict[str, dict[str, Any]] = {}
    for form, stats in (("exact", exact), ("sketch", sk)):
        for label, kw in (("grad", {}), ("grad-adam", {"adam": True}), ("grad-sign", {"sign": True})):
            scores.setdefault(label, {})[form] = stats.scores(**kw)
    path = work() / f"look-{name}.safetensors"
    if path.is_file():
        look = Lookahead.load(path)
    else:
        look = lookahead(lm, load_dataset(train_spec, max_examples=100).examples, spec(), LOOK,
                         lambda m: print(m, file=sys.stderr))
        look.save(path)
    secs["lookahead steps"] = round(look.seconds, 1)
    for k in LOOK:
        move = -look.displacement(k).double()  # theta0 - theta_k
        scores[f"look-{k} fo"] = {"exact": exact.along(move), "sketch": sk.along(sketch(move, GRADIENT_SKETCH))}
    states = {f"look-{k}": look.states[k] for k in LOOK} | {
        f"line-{k}": line_point(spec(), t.mean, look.start, k) for k in LINE}
    for label, state in states.items():
        started = time.perf_counter()
        moved = moved_losses(lm, spec(), records, {label: state})[label]
        secs[f"{label} losses"] = round(time.perf_counter() - started, 1)
        scores[label] = {"exact": drops(base, moved)}
    done["sets"][name] = scores
    save(done)


def order() -> dict[str, str]:
    """Two earlier sets where grad fails most (MATH-500's flat gains, physics ranked 10th of 10: the
    analysis is built on them while the round's truth runs), then the round's sets, then the rest."""
    first = ("train-5-math500-test", "train-3-mmlu-pro-cot-train-physics")
    return {n: EARLIER[n] for n in first} | NEW | {n: s for n, s in EARLIER.items() if n not in first}


def run() -> None:
    from sts.gradients import adapted, domain_losses
    from sts.models import default_model_dir, load_model

    records = probe_records()
    check_disjoint(records)
    done = load()
    done.setdefault("sets", {})
    done.setdefault("seconds", {})
    done |= {"probes": {d: [e.uid for e in q] for d, q in records.items()}, "look": list(LOOK), "line": list(LINE)}
    lm = load_model(str(default_model_dir()))
    dom = domain_sides()
    if "base losses" not in done:
        started = time.perf_counter()
        done["base losses"] = domain_losses(lm, adapted(lm, spec()), records, desc="loss at theta0")
        done["seconds"]["base losses"] = round(time.perf_counter() - started, 1)
        save(done)
    for name, train_spec in order().items():
        if name in done["sets"]:
            continue
        done["seconds"].setdefault(name, {})
        print(f"{name}: {train_spec}", file=sys.stderr)
        one_set(lm, name, train_spec, records, dom, done["base losses"], done)


# --- analyse -----------------------------------------------------------------------------------------

REPLICATES = 1000
TIE = 0.05  # the rule's "within 0.05 of the best specificity"
COST_LIMIT = 3.0  # the rule's "more than 3x grad's cold time: an option, not the default"
TEXTS = ("line-", "look-")  # candidates whose domain side reads the probe records' text (rule (d))


def measured() -> dict[str, dict[str, Any]]:
    """set -> domain -> the measured cot_nll change: the earlier rounds' and this round's evaluations
    (a set of this round counts once its tuned evaluation is committed)."""
    from sts import correlation as co
    from sts.evaluation import Evaluation

    out = pr.measured()
    base = HERE / "eval-base-reference"
    for name in NEW:
        tuned = HERE / name / "eval-tuned-reference"
        if base.is_dir() and tuned.is_dir():
            out[name] = co.changes_from_evaluations(Evaluation.load(base), Evaluation.load(tuned), "cot_nll")
    return out


def forms(done: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """candidate label -> set -> domain -> score: the gradient candidates in the shipped (sketched)
    form and, labelled "exact", without the sketch; line and look exact (they have no sketch)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, scores in done["sets"].items():
        for cand, by_form in scores.items():
            for form, values in by_form.items():
                label = cand if form == "sketch" or "sketch" not in by_form else f"{cand} exact"
                out.setdefault(label, {})[name] = {d: values[d] for d in MEASURED if d in values}
    return out


def judge(scores: dict[str, dict[str, float]], changes: dict[str, Any],
          own: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Per-set Pearson and own-domain ranks of `scores`; specificity (with its interval and leaving
    each set out) and the swap test of `own` where given (a `+lib` candidate's own part)."""
    import statistics

    from sts import correlation as co

    sets = [n for n in scores if n in changes]
    ch = {n: changes[n] for n in sets}
    split = own or scores
    per_set = {n: co.correlate(scores[n], ch[n], REPLICATES, 0, None, "signed", "cot_nll").pearson for n in sets}
    spec = co.correlate_matrix({n: split[n] for n in sets}, ch, "specificity", REPLICATES, 0, "cot_nll")
    loo = [co.correlate_matrix({n: split[n] for n in sets if n != out}, ch, "specificity", 20, 0, "cot_nll").pearson
           for out in sets] if len(sets) > 2 else []
    swap = co.swap_test({n: split[n] for n in sets}, ch, REPLICATES, 0, "cot_nll")
    ranks = {n: co.own_domain_rank(scores[n], ch[n], OWN[n]) for n in sets if OWN.get(n)}
    return {"sets": sets, "median_pearson": statistics.median(per_set.values()), "per_set": per_set,
            "specificity": spec.pearson, "specificity_ci": list(spec.pearson_ci),
            "specificity_loo": [min(loo), statistics.median(loo)] if loo else None,
            "swap": {"own": swap.own, "other": swap.other, "difference": swap.difference,
                     "difference_ci": list(swap.difference_ci)}, "own_domain": ranks}


def with_library(scores: dict[str, dict[str, float]], changes: dict[str, Any], library: list[str]
                 ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Each set's combined (shared + own) and own part (`sts.library.decompose`), the library being
    the earlier sets' measured changes and this candidate's scores, less the judged set itself."""
    from sts.library import Library, LibrarySet, decompose

    lib = Library("", "", 0, "cot_nll", {n: LibrarySet(n, {"c": scores[n]}, {"cot_nll": {
        d: c.delta for d, c in changes[n].items()}}) for n in library if n in scores and n in changes})
    parts = {n: decompose(lib, "c", scores[n], leave_out=n) for n in scores if n in changes}
    return {n: p.combined for n, p in parts.items()}, {n: p.own for n, p in parts.items()}


def table(done: dict[str, Any], changes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """candidate (with and without +lib) -> group -> its judgement, over the sets each group has."""
    groups = {"round (chooses)": list(NEW), "earlier ten (reports)": list(EARLIER),
              "all thirteen (reports)": [*NEW, *EARLIER]}
    out: dict[str, dict[str, Any]] = {}
    for label, by_set in forms(done).items():
        for group, names in groups.items():
            have = [n for n in names if n in by_set and n in changes]
            if len(have) < 2:
                continue
            scores = {n: by_set[n] for n in have}
            out.setdefault(label, {})[group] = judge(scores, changes)
            combined, own = with_library(by_set, changes, list(EARLIER))
            out.setdefault(f"{label} +lib", {})[group] = judge({n: combined[n] for n in have}, changes,
                                                               {n: own[n] for n in have})
    return out


def analyse() -> None:
    done = load()
    changes = measured()
    judged = table(done, changes)
    (HERE / "analysis.json").write_text(json.dumps({"table": judged}, indent=1) + "\n")
    for label, groups in judged.items():
        for group, r in groups.items():
            print(f"{label:22s} {group:24s} n={len(r['sets']):2d} spec {r['specificity']:+.2f} "
                  f"[{r['specificity_ci'][0]:+.2f}] swap {r['swap']['difference']:+.2f} "
                  f"median r {r['median_pearson']:+.2f}  own {r['own_domain']}")


if __name__ == "__main__":
    {"run": run, "analyse": analyse}[sys.argv[1]]()
