"""Issue 39, item 4: the domain side for domains without reference answers. Rule and candidates:
PREREGISTRATION.md beside this file.

    .venv/bin/python -m experiments.plain.plain run       # resumable; needs docs/results/probes' run
    .venv/bin/python -m experiments.plain.plain analyse   # PLAIN.md, analysis.json

`run` computes the two new candidates on the ten measured sets: C (the base model's own chains of
thought as the domain side) and D (the nearest reference domain's side, its own category excluded),
with their costs, into `plain.json` (committed); A and B are read from committed files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from experiments import common
from experiments.common import RESULTS
from experiments.probes import probes  # its sets, training sides and truth
from sts.defaults import PROBE_RECORDS  # D: the shipped reference domains' probe records

HERE = RESULTS / "plain"  # its reports (this script is experiments/plain)

OUT = HERE / "plain.json"
QUESTIONS = 20  # candidate C's questions a domain (the pre-registration's 20)
MAX_NEW_TOKENS = 256
SKETCH = 1 << 16


def load() -> dict[str, Any]:
    return common.read_json(OUT, {"seconds": {}})


def save(done: dict[str, Any]) -> None:
    common.write_json(done, OUT)


def plain_domains() -> dict[str, list[Any]]:
    """The embedded MMLU questions of the ten measured categories, first 100 a domain, every
    question of the ten training sets left out."""
    from sts.data.datasets import clean_questions, load_dataset

    held = tuple(e for spec in {**probes.TRANSFER, **probes.HELDOUT}.values()
                 for e in load_dataset(spec, max_examples=100).examples)
    groups, _ = clean_questions("embedded:mmlu", [], 100, examples=held)
    measured = [d for d in json.loads(probes.OUT.read_text())["probes"]
                if d not in ("chemistry", "economics", "health", "law")]
    return {d: groups[d] for d in measured}


def run() -> None:
    import dataclasses

    import torch

    from sts.data.datasets import load_dataset
    from sts.data.embedded import default_sae_dir
    from sts.engine.evaluation import _render_chat, cot_messages
    from sts.engine.finetuning import FinetuneSpec
    from sts.engine.generate import generate_transformers
    from sts.engine.gradients import DomainGradients, adapted, domain_side
    from sts.engine.models import default_model_dir, load_model
    from sts.prediction.config import PredictConfig
    from sts.prediction.extraction import extract_all
    from sts.prediction.session import Session

    done = load()
    domains = plain_domains()
    lm = load_model(str(default_model_dir()))
    spec = FinetuneSpec(max_steps=60, batch_size=4, seed=0)
    model = None
    # C: the base model's own chains of thought, read as each record's reference
    generated = done.setdefault("generated", {})
    for d, qs in domains.items():
        path = probes.work() / f"plain-generated-{probes.slug(d)}.safetensors"
        if path.is_file():
            continue
        started = time.perf_counter()
        prompts = [_render_chat(lm.tokenizer, cot_messages(e, [])) for e in qs[:QUESTIONS]]
        texts = generate_transformers(lm, prompts, MAX_NEW_TOKENS, batch_size=QUESTIONS)
        mid = time.perf_counter()
        model = model or adapted(lm, spec)
        recs = [dataclasses.replace(e, cot=t.strip() or "-") for e, t in zip(qs[:QUESTIONS], texts)]
        domain_side(lm, model, {d: recs}).save(path)
        generated[d] = {"uids": [e.uid for e in recs], "texts": texts}
        done["seconds"][f"C:{d}"] = {"generation": round(mid - started, 1),
                                     "backward": round(time.perf_counter() - mid, 1)}
        save(done)
        print(f"C {d}: {done['seconds'][f'C:{d}']}", file=sys.stderr)
    # B's cost, and D's nearest reference domains: the questions' SAE and residual readouts (fresh cache)
    if "nearest" not in done:
        import tempfile

        from sts.cache import Cache

        drawn = json.loads(probes.OUT.read_text())["probes"]
        records = {e.uid: e for spec_ in (probes.TRAIN_FILE, probes.REFS_FILE) for e in load_dataset(spec_).examples}
        refs = {d: [records[u] for u in uids[:PROBE_RECORDS]] for d, uids in drawn.items()}
        cfg = PredictConfig(model=str(default_model_dir()), sae=str(default_sae_dir()), score="act")
        few = load_dataset("embedded:champ", max_examples=3)
        means: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for label, groups in (("plain", domains), ("reference", refs)):
                session = Session(cfg, print)
                session.cache = Cache(Path(tmp) / label, shipped=None)
                extract_all(cfg, few, {d: groups[d][:1] for d in list(groups)[:1]}, ("cosine",), None, print,
                            session)  # the model and the training side loaded before the clock starts
                started = time.perf_counter()
                ex = extract_all(cfg, few, groups, ("act", "cosine"), None, print, session)
                done["seconds"][f"readouts:{label}"] = round(time.perf_counter() - started, 1)
                means[label] = {d: (st.sum / st.count).double() for d, st in ex.domains["raw"].items()}

        def cos(a: torch.Tensor, b: torch.Tensor) -> float:
            return float(a @ b / (a.norm() * b.norm()))

        done["nearest"] = {d: max((r for r in means["reference"] if r != d),
                                  key=lambda r, d=d: cos(means["plain"][d], means["reference"][r]))
                           for d in means["plain"]}
        save(done)
    scores(done, DomainGradients)


def scores(done: dict[str, Any], domain_cls: Any) -> None:
    """C and D for every set (sketched as shipped)."""
    from sts.engine.gradients import GradientStats, TrainingGradients

    gen = {d: domain_cls.load(probes.work() / f"plain-generated-{probes.slug(d)}.safetensors").domains[d]
           for d in done["generated"]}
    borrowed = {d: probes.prefix_sides(r, PROBE_RECORDS)[PROBE_RECORDS][0]  # type: ignore[index]
                for d, r in done["nearest"].items()}
    out: dict[str, Any] = {}
    for name in {**probes.TRANSFER, **probes.HELDOUT}:
        t = TrainingGradients.load(probes.work() / f"train-{name}.safetensors").sketched(SKETCH)
        for label, sides in (("C", gen), ("D", borrowed)):
            dom = domain_cls({d: g.float() for d, g in sides.items()}, dict.fromkeys(sides, 1)).sketched(SKETCH)
            out.setdefault(label, {})[name] = GradientStats.join(t, dom).scores(adam=False)
    done["scores"] = out
    save(done)


# --- analyse -----------------------------------------------------------------------------------------

def candidates(done: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """label -> set -> domain -> score, the four candidates."""
    results = probes.RESULTS
    shipped = json.loads((results / "heldout" / "shipped-scores.json").read_text())["sets"]
    library = json.loads((probes.HERE.parents[2] / "src" / "sts" / "assets" / "library-smollm2-135m-l22.json")
                         .read_text())["sets"]
    act = {n: library[n]["scores"]["act"] for n in probes.TRANSFER} | {
        n: json.loads((results / "heldout" / n / "scores-icl.json").read_text())["scores"]["act"]
        for n in probes.HELDOUT}
    return {"A. grad on answer texts": {n: shipped[n]["scores"]["grad"] for n in shipped},
            "B. act on the questions (k 400)": act,
            "C. grad on the model's own chains of thought": done["scores"]["C"],
            "D. grad borrowing the nearest other reference domain": done["scores"]["D"]}


def nll_changes() -> dict[str, Any]:
    from sts.analysis import correlation as co
    from sts.engine.evaluation import Evaluation

    base = Evaluation.load(probes.RESULTS / "transfer" / "eval-base")
    return {n: co.changes_from_evaluations(base, Evaluation.load(probes.RESULTS / "transfer" / n / "eval-tuned"),
                                           "nll") for n in probes.TRANSFER}


def analyse() -> None:
    done = load()
    truths = {"cot_nll, ten sets (chooses)": probes.measured(), "nll, seven transfer sets (reports)": nll_changes()}
    table: dict[str, dict[str, Any]] = {}
    for label, by_set in candidates(done).items():
        for truth, changes in truths.items():
            scores = {n: {d: v for d, v in by_set[n].items() if d in changes[n]} for n in changes}
            table.setdefault(label, {})[truth] = common.judge(scores, changes)
    cost = costs(done)
    chosen = rule(table, cost)
    (HERE / "analysis.json").write_text(json.dumps({"table": table, "cost": cost, "rule": chosen}, indent=1) + "\n")
    write_markdown(done, table, cost, chosen)


def costs(done: dict[str, Any]) -> dict[str, float]:
    """Cold seconds a domain on 2 cores: A from benchmarks/predict_speed.py's measurement (14 MMLU
    domains' answer-text sides in about 740 s, 2026-11-30); B and D the questions' readouts measured
    here (D's reference side ships); C generation and backward measured here."""
    sec = done["seconds"]
    import statistics

    # the median domain: the tests and the other runs of this session shared the 2 cores with
    # some domains (business, generated 10 at a time before a restart, 562 s; history 504 s)
    c = [v["generation"] + v["backward"] for k, v in sec.items() if k.startswith("C:")]
    plain = sec["readouts:plain"] / len(done["nearest"])
    return {"A. grad on answer texts": 740 / 14, "B. act on the questions (k 400)": plain,
            "C. grad on the model's own chains of thought": statistics.median(c),
            "D. grad borrowing the nearest other reference domain": plain}


def rule(table: dict[str, dict[str, Any]], cost: dict[str, float]) -> dict[str, Any]:
    """PREREGISTRATION.md's rule."""
    key = "cot_nll, ten sets (chooses)"
    ok = [c for c, r in table.items() if r[key]["specificity_ci"][0] > 0 and r[key]["swap"]["difference"] > 0]
    if not ok:
        return {"winner": None, "qualified": []}
    best = max(table[c][key]["specificity"] for c in ok)
    near = [c for c in ok if table[c][key]["specificity"] >= best - 0.05]
    return {"winner": min(near, key=lambda c: cost[c]), "qualified": ok, "best_specificity": best}


def write_markdown(done: dict[str, Any], table: dict[str, dict[str, Any]], cost: dict[str, float],
                   chosen: dict[str, Any]) -> None:
    f = probes._f
    lines = ["# Domains without reference answers: which domain side (issue 39, item 4)", "",
             "Generated by `.venv/bin/python -m experiments.plain.plain analyse`; rule and candidates fixed before",
             "C and D were computed: [PREREGISTRATION.md](PREREGISTRATION.md). Each plain domain is the embedded",
             "MMLU questions of one MMLU-Pro category; the truth is the committed change on reference records.", "",
             f"**The rule's answer: {chosen['winner'] or 'none qualifies (answer texts stay, unvalidated)'}** "
             f"(qualified: {', '.join(chosen['qualified']) or 'none'}).", "",
             "D's nearest other reference domain: " + ", ".join(f"{d} -> {r}" for d, r in done["nearest"].items())
             + ".", ""]
    for truth in ("cot_nll, ten sets (chooses)", "nll, seven transfer sets (reports)"):
        lines += [f"## Truth: {truth}", "",
                  "| candidate | specificity [95%] | median per-set Pearson | swap own - other [95%] | "
                  "own-domain rank (score/truth) | cold s a domain |", "|---|---|---|---|---|---|"]
        for label, groups in table.items():
            r = groups[truth]
            ranks = " ".join(f"{v['score_rank']}/{v['change_rank']}" for v in r["own_domain"].values())
            lines.append(f"| {label} | {f(r['specificity'])} [{f(r['specificity_ci'][0])}, "
                         f"{f(r['specificity_ci'][1])}] | {f(r['median_pearson'])} | {f(r['swap']['difference'])} "
                         f"[{f(r['swap']['difference_ci'][0])}, {f(r['swap']['difference_ci'][1])}] | {ranks} | "
                         f"{cost[label]:.0f} |")
        lines.append("")
    lines += ["Costs: A from `benchmarks/predict_speed.py`'s measurement (the 14 MMLU domains' answer-text sides in",
              "about 740 s on 2 cores, 2026-11-30); B and D the questions' SAE and residual readouts measured here",
              "(D's reference side ships with the package); C the generation and the backward passes measured here",
              "(the median domain: some domains shared the cores with other work; per-domain seconds in plain.json).",
              "C read 20 questions a domain as pre-registered; the probe count became 10 after that was written.",
              ""]
    (HERE / "PLAIN.md").write_text("\n".join(lines))


if __name__ == "__main__":
    {"run": run, "analyse": analyse}[sys.argv[1] if len(sys.argv) > 1 else "run"]()
