"""Issue 39, item 2: the gradient scores re-judged on probe records the ground truth never measured,
and how many probe records a domain needs. Rule and roles: PREREGISTRATION.md beside this file.

    .venv/bin/python -m experiments.probes.probes run       # resumable, stage by stage
    .venv/bin/python -m experiments.probes.probes analyse   # PROBES.md, probes.png, analysis.json

`run` draws each MMLU-Pro category's probe records (`sts.data.references.draw`, seed 0) from the records
that no committed evaluation read and no committed training set can hold, computes each domain's
exact gradient side on them in nested chunks (the first 5, 10, 20 and 40 records are prefixes of
one draw), then each measured set's exact training side, and writes every set's `grad` and
`grad-adam` at each probe count, exact and through the shipped count sketch, to `probes.json`
(committed). The exact sides (20 MB each) stay in the cache (`$STS_CACHE/probes`), not in git.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from experiments import common
from experiments.common import RESULTS, D, judge, read_json, write_json

HERE = RESULTS / "probes"  # its reports (this script is experiments/probes)

TRAIN_FILE, REFS_FILE = f"{D}/mmlu_pro_cot_train.jsonl", f"{D}/mmlu_pro_cot_refs.jsonl"
CHUNKS = (0, 5, 10, 20, 40)  # nested probe counts: 5, 10, 20, 40 (history has 46 unused records)
SEED = 0
# committed training sets are drawn from a category's first records (`--max-train` <= 200)
EXCLUDE_FIRST = 200
OUT = HERE / "probes.json"
TRANSFER = {"train-1-champ": "embedded:champ", "train-2-alpaca-en-demo": f"{D}/alpaca_en_demo.json",
            "train-3-mmlu-pro-cot-train-physics": f"{TRAIN_FILE}#category=physics",
            "train-4-mmlu-pro-cot-train-psychology": f"{TRAIN_FILE}#category=psychology",
            "train-5-math500-test": f"{D}/math500_test.jsonl",
            "train-6-mmlu-pro-cot-train-business": f"{TRAIN_FILE}#category=business",
            "train-7-mmlu-pro-cot-train-biology": f"{TRAIN_FILE}#category=biology"}  # transfer/run.sh
HELDOUT = {"train-1-mmlu-pro-cot-train-computer-science": f"{TRAIN_FILE}#category=computer science",
           "train-2-mmlu-pro-cot-train-history": f"{TRAIN_FILE}#category=history",
           "train-3-math500-test-400-500": f"{D}/math500_test.jsonl#rows=400:500"}  # heldout/run.sh
EXPERIMENTS = {"transfer": TRANSFER, "heldout": HELDOUT}

def work() -> Path:
    from sts.cache import cache_root

    path = cache_root() / "probes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name)


def evaluated_ids(exclude: Path | None = None) -> set[str]:
    """Every question id a committed evaluation measured on reference records (cot_nll or
    cot_nll_content), in any results folder but `exclude` (a round's own, which reads records
    its rule chose)."""
    ids: set[str] = set()
    for path in RESULTS.glob("**/predictions.csv"):
        if exclude is not None and path.is_relative_to(exclude):
            continue
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("cot_nll") or row.get("cot_nll_content"):
                    ids.add(row["question_id"])
    return ids


def draw_probes() -> tuple[dict[str, list[Any]], dict[str, int]]:
    """Each category's probe records (the first 40 of one seeded draw) and the size of its pool:
    the records past the first 200 of mmlu_pro_cot_train's category (all 50 of mmlu_pro_cot_refs'),
    less every evaluated record and every record sharing a question stem with those left out."""
    from sts.data.datasets import decontaminate, load_dataset
    from sts.data.references import draw

    used = evaluated_ids()
    probes, pools = {}, {}
    for spec, skip in ((TRAIN_FILE, EXCLUDE_FIRST), (REFS_FILE, 0)):
        for d, q in load_dataset(spec).by_domain().items():
            out = q[:skip] + [e for e in q[skip:] if e.uid in used]
            kept, _ = decontaminate({d: [e for e in q[skip:] if e.uid not in used]}, out)
            pools[d] = len(kept[d])
            probes[d] = draw(kept[d], CHUNKS[-1], SEED, d)
    return probes, pools


def load(path: Path = OUT) -> dict[str, Any]:
    return read_json(path, {})


def save(done: dict[str, Any], path: Path = OUT) -> None:
    write_json(done, path)


def run() -> None:
    from sts.data.datasets import load_dataset
    from sts.engine.finetuning import FinetuneSpec
    from sts.engine.gradients import DomainGradients, TrainingGradients, adapted, domain_side, training_side
    from sts.engine.models import default_model_dir, load_model

    spec = FinetuneSpec(max_steps=60, batch_size=4, seed=0)  # both run.sh's (and sts predict's default)
    probes, pools = draw_probes()
    done = load()
    drawn = {d: [e.uid for e in q] for d, q in probes.items()}
    if done.get("probes", drawn) != drawn:
        raise SystemExit("the probe draw differs from the committed one in probes.json: the data or the rule changed")
    done |= {"probes": drawn, "pools": pools, "chunks": list(CHUNKS), "seed": SEED,
             "finetune": {"lora_r": spec.lora_r, "alpha": spec.alpha, "seed": spec.seed}}
    done.setdefault("seconds", {})
    done.setdefault("tokens", {})
    save(done)
    lm = load_model(str(default_model_dir()))
    model = adapted(lm, spec)
    measured = [d for d in probes if d not in ("chemistry", "economics", "health", "law")]
    for d in measured + [d for d in probes if d not in measured]:  # the ten measured domains first
        for a, b in zip(CHUNKS, CHUNKS[1:]):
            path = work() / f"domain-{slug(d)}-{a}-{b}.safetensors"
            if path.is_file():
                continue
            started = time.perf_counter()
            side = domain_side(lm, model, {d: probes[d][a:b]})
            side.save(path)
            done["seconds"][f"{d}:{a}-{b}"] = round(time.perf_counter() - started, 1)
            done["tokens"][f"{d}:{a}-{b}"] = sum(len(lm.tokenizer(e.prompt + (e.cot or ""))["input_ids"])
                                                for e in probes[d][a:b])
            save(done)
            print(f"{d} {a}-{b}: {done['seconds'][f'{d}:{a}-{b}']} s", file=sys.stderr)
        if d == measured[-1]:
            for name, train_spec in {**TRANSFER, **HELDOUT}.items():
                path = work() / f"train-{name}.safetensors"
                if path.is_file():
                    continue
                started = time.perf_counter()
                side = training_side(lm, model, load_dataset(train_spec, max_examples=100).examples, spec)
                side.save(path)
                done["seconds"][name] = round(time.perf_counter() - started, 1)
                done.setdefault("training", {})[name] = {"examples": side.examples, "tokens": side.tokens}
                save(done)
                print(f"{name}: {done['seconds'][name]} s", file=sys.stderr)
    scores(done, DomainGradients, TrainingGradients)


def prefix_sides(d: str, upto: int = CHUNKS[-1]) -> dict[int, tuple[Any, int]] | None:
    """Domain d's exact side at each probe count up to `upto` (a chunk bound): the record-weighted
    mean of its first chunks (the mean gradient over those records, as `domain_side` gives it on
    them at once), with the records behind it; None where a chunk is not computed."""
    from sts.engine.gradients import DomainGradients

    chunks = [(b, work() / f"domain-{slug(d)}-{a}-{b}.safetensors") for a, b in zip(CHUNKS, CHUNKS[1:]) if b <= upto]
    if not all(p.is_file() for _, p in chunks):
        return None
    out, total, count = {}, None, 0
    for n, path in chunks:
        g = DomainGradients.load(path)
        part = g.domains[d].double() * g.records[d]
        total, count = (part if total is None else total + part), count + g.records[d]
        out[n] = (total / count, count)
    return out


def scores(done: dict[str, Any], domain_cls: Any, train_cls: Any) -> None:
    """Every set's grad and grad-adam at each probe count, exact and sketched (the shipped form);
    only domains whose chunks are all computed."""
    from sts.defaults import GRADIENT_SKETCH
    from sts.engine.gradients import GradientStats

    sides: dict[int, dict[str, Any]] = {}
    for d in done["probes"]:
        for n, side in (prefix_sides(d) or {}).items():
            sides.setdefault(n, {})[d] = side
    out: dict[str, Any] = {}
    for name in {**TRANSFER, **HELDOUT}:
        path = work() / f"train-{name}.safetensors"
        if not path.is_file():
            continue
        t = train_cls.load(path)
        sketched = t.sketched(GRADIENT_SKETCH)
        for n, per in sides.items():
            dom = domain_cls({d: g.float() for d, (g, _) in per.items()}, {d: c for d, (_, c) in per.items()})
            for form, stats in (("exact", GradientStats.join(t, dom)),
                                ("sketch", GradientStats.join(sketched, dom.sketched(GRADIENT_SKETCH)))):
                for score in ("grad", "grad-adam"):
                    out.setdefault(form, {}).setdefault(str(n), {}).setdefault(name, {})[score] = \
                        stats.scores(adam=score == "grad-adam")
    done["scores"] = out
    save(done)


# --- analyse -----------------------------------------------------------------------------------------

def measured() -> dict[str, dict[str, Any]]:
    """set -> domain -> the measured cot_nll change (the committed evaluations)."""
    return {n: c for exp, sets in EXPERIMENTS.items() for n, c in common.measured(RESULTS / exp, list(sets)).items()}


def in_sample() -> dict[str, dict[str, dict[str, float]]]:
    """The committed gradient scores, whose domain side read evaluated records: the transfer
    sets' from 20 of each domain's 100 (transfer/stats/gradients.json), the held-out round's from
    all 100 (its scores-icl.json)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    stats = json.loads((RESULTS / "transfer" / "stats" / "gradients.json").read_text())["sets"]
    for name in TRANSFER:
        out[name] = {s: stats[name]["scores"][f"{s}:cot_nll"] for s in ("grad", "grad-adam")}
    for name in HELDOUT:
        scores = json.loads((RESULTS / "heldout" / name / "scores-icl.json").read_text())["scores"]
        out[name] = {s: scores[s] for s in ("grad", "grad-adam")}
    return out


def analyse(out: Path = HERE) -> None:
    """PROBES.md, analysis.json and probes.png into `out` (this folder unless given: the test suite
    regenerates them elsewhere and compares)."""
    done = load()
    changes = measured()
    groups = {"transfer (chooses)": list(TRANSFER), "held-out round (reports)": list(HELDOUT),
              "all ten (reports)": [*TRANSFER, *HELDOUT]}
    table: dict[str, dict[str, Any]] = {}
    forms = {f"{form} n={n}": done["scores"][form][str(n)] for form in ("sketch", "exact") for n in CHUNKS[1:]
             if str(n) in done.get("scores", {}).get(form, {})}
    forms["in-sample (committed)"] = in_sample()
    for label, by_set in forms.items():
        for score in ("grad", "grad-adam"):
            for group, names in groups.items():
                if all(n in by_set for n in names):
                    scores = {n: {d: v for d, v in by_set[n][score].items() if d in changes[n]} for n in names}
                    table.setdefault(f"{score} {label}", {})[group] = judge(scores, changes)
    chosen = rule(table)
    (out / "analysis.json").write_text(json.dumps({"table": table, "rule": chosen}, indent=1) + "\n")
    write_markdown(done, table, chosen, out)
    figure(done, table, out)


def rule(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """PREREGISTRATION.md's rule: the smallest probe count whose sketched grad, on the transfer
    sets, is within 0.05 of the 40-record value in both specificity and median per-set Pearson."""
    group = "transfer (chooses)"
    ref = table["grad sketch n=40"][group]
    for n in CHUNKS[1:]:
        row = table[f"grad sketch n={n}"][group]
        if (row["specificity"] >= ref["specificity"] - 0.05
                and row["median_pearson"] >= ref["median_pearson"] - 0.05):
            return {"probe_records": n, "reference": {"specificity": ref["specificity"],
                                                      "median_pearson": ref["median_pearson"]},
                    "chosen": {"specificity": row["specificity"], "median_pearson": row["median_pearson"]}}
    raise AssertionError("n=40 always qualifies")


def _f(x: float) -> str:
    return "nan" if x != x else f"{x:+.2f}"


def write_markdown(done: dict[str, Any], table: dict[str, dict[str, Any]], chosen: dict[str, Any],
                   out: Path = HERE) -> None:
    lines = ["# The gradient scores on probe records the ground truth never measured (issue 39, item 2)", "",
             "Generated by `.venv/bin/python -m experiments.probes.probes analyse` from `probes.json` (written by",
             "`probes.py run`) and the committed evaluations. Rule and roles fixed before any score was computed:",
             "[PREREGISTRATION.md](PREREGISTRATION.md).", "",
             f"Probe records: per category, a seeded draw (`sts.data.references.draw`, seed {SEED}) from the records no",
             "committed evaluation measured, past each category's first 200 (where committed training sets come",
             "from); nested: the first 5 of the draw are in the first 10, and so on. Pool sizes: "
             + ", ".join(f"{d} {n}" for d, n in done["pools"].items()) + ".", "",
             f"**The rule's answer: {chosen['probe_records']} probe records a domain** (sketched `grad` on the "
             f"transfer sets: specificity {_f(chosen['chosen']['specificity'])}, median per-set Pearson "
             f"{_f(chosen['chosen']['median_pearson'])}; at 40 records {_f(chosen['reference']['specificity'])} and "
             f"{_f(chosen['reference']['median_pearson'])}).", ""]
    for group in ("transfer (chooses)", "held-out round (reports)", "all ten (reports)"):
        lines += [f"## {group}", "",
                  "| score, domain side | median per-set Pearson | specificity [95%] | leave-one-set-out "
                  "specificity (min, median) | swap own - other [95%] | own-domain rank (score/truth) |",
                  "|---|---|---|---|---|---|"]
        for label, groups in table.items():
            if group not in groups:
                continue
            r = groups[group]
            loo = "-" if r["specificity_loo"] is None else ", ".join(_f(v) for v in r["specificity_loo"])
            ranks = " ".join(f"{v['score_rank']}/{v['change_rank']}" for v in r["own_domain"].values())
            lines.append(f"| {label} | {_f(r['median_pearson'])} | {_f(r['specificity'])} "
                         f"[{_f(r['specificity_ci'][0])}, {_f(r['specificity_ci'][1])}] | {loo} | "
                         f"{_f(r['swap']['difference'])} [{_f(r['swap']['difference_ci'][0])}, "
                         f"{_f(r['swap']['difference_ci'][1])}] | {ranks} |")
        lines.append("")
    cost = {n: sum(v for k, v in done["seconds"].items() if ":" in k and int(k.rsplit(":", 1)[1].split("-")[1]) <= n)
            for n in CHUNKS[1:]}
    domains = len({k.rsplit(":", 1)[0] for k in done["seconds"] if ":" in k})
    lines += ["## Cost", "",
              f"Seconds of backward passes for the domain side, summed over the {domains} domains computed, on 2 "
              "cores (chunks run one after another; a count's cost is its chunks'):", "",
              "| probe records | seconds |", "|---|---|"] + [f"| {n} | {cost[n]:.0f} |" for n in cost] + [""]
    lines += ["In-sample (committed): the transfer sets' domain side read 20 of the 100 evaluated records a domain",
              "(`transfer/stats/gradients.json`), the held-out round's all 100 (its `scores-icl.json`).", ""]
    (out / "PROBES.md").write_text("\n".join(lines))


def figure(done: dict[str, Any], table: dict[str, dict[str, Any]], out: Path = HERE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [n for n in CHUNKS[1:] if f"grad sketch n={n}" in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, group in zip(axes, ("transfer (chooses)", "all ten (reports)")):
        for score, colour in (("grad", "C0"), ("grad-adam", "C1")):
            rows = [table[f"{score} sketch n={n}"][group] for n in ns]
            spec = [r["specificity"] for r in rows]
            lo = [r["specificity"] - r["specificity_ci"][0] for r in rows]
            hi = [r["specificity_ci"][1] - r["specificity"] for r in rows]
            ax.errorbar(ns, spec, yerr=[lo, hi], marker="o", color=colour, capsize=3, label=f"{score} specificity")
            ax.plot(ns, [r["median_pearson"] for r in rows], "s--", color=colour, label=f"{score} median Pearson")
            ins = table[f"{score} in-sample (committed)"][group]["specificity"]
            ax.axhline(ins, color=colour, lw=0.8, ls=":", label=f"{score} in-sample specificity")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("probe records a domain (disjoint from the evaluated ones)")
        ax.set_title(group)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("correlation with the measured cot_nll change")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "probes.png", dpi=120)


def library() -> None:
    """The embedded reference domains' library (`sts.data.embedded.REFERENCE_LIBRARY`): the ten measured
    sets' grad and grad-adam as `sts predict` computes them on `embedded:mmlu-pro-cot` (the shipped
    sketch of the first PROBE_RECORDS probe records, all 14 domains), with their measured changes,
    so that the default's shared / own split and calibration are in the form that ships."""
    from sts.analysis.library import Library, LibrarySet, sae_identity, set_name, side_label
    from sts.data.datasets import load_dataset
    from sts.data.embedded import REFERENCE_DOMAINS, REFERENCE_LIBRARY, SAE_DIR
    from sts.defaults import DEFAULT_K, PROBE_RECORDS
    from sts.scores.score import gradient_scores

    done = load()
    chosen = json.loads((HERE / "analysis.json").read_text())["rule"]["probe_records"]
    if chosen != PROBE_RECORDS:
        raise SystemExit(f"the rule chose {chosen} probe records, sts.defaults.PROBE_RECORDS is {PROBE_RECORDS}")
    by_set = done["scores"]["sketch"][str(PROBE_RECORDS)]
    nll = {}
    from sts.analysis import correlation as co
    from sts.engine.evaluation import Evaluation

    base = Evaluation.load(RESULTS / "transfer" / "eval-base")
    for name in TRANSFER:
        tuned = Evaluation.load(RESULTS / "transfer" / name / "eval-tuned")
        nll[name] = {d: c.delta for d, c in co.changes_from_evaluations(base, tuned, "nll").items()}
    sets = {}
    for name, (spec, changes) in {n: (s, measured()[n]) for n, s in {**TRANSFER, **HELDOUT}.items()}.items():
        deltas = {"cot_nll": {d: c.delta for d, c in changes.items()}} | ({"nll": nll[name]} if name in nll else {})
        sets[name] = LibrarySet(set_name(spec), {s: by_set[name][s] for s in gradient_scores()}, deltas)
    side = side_label(True, REFERENCE_DOMAINS, load_dataset(REFERENCE_DOMAINS).examples)
    lib = Library(sae_identity(str(SAE_DIR)), "embedded SmolLM2-135M-Instruct", DEFAULT_K, "cot_nll", sets,
                  sides=dict.fromkeys(gradient_scores(), side))
    lib.save(REFERENCE_LIBRARY)
    print(f"wrote {REFERENCE_LIBRARY}: {len(sets)} sets, {side}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "analyse":
        analyse(Path(sys.argv[2]))
    else:
        {"run": run, "analyse": analyse, "library": library}[sys.argv[1] if len(sys.argv) > 1 else "run"]()
