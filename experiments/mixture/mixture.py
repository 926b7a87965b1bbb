"""The measured mixture (PREREGISTRATION.md beside this file): evaluate the tuned mixture on the
transfer experiment's reference records, then answer the pre-registered questions.

    python -m experiments.mixture.mixture evaluate MODEL_DIR   # the tuned model's cot_nll
    python -m experiments.mixture.mixture analyse              # MIXTURE.md, mixture.json

Run from the repository root with ../shared beside it. The reference records are the ones the
transfer experiment's `eval-base-reference` scored (its base model is the baseline here too):
they are rebuilt from the transfer's own settings (`records` of `experiments/content/content.py`)
and checked against that evaluation's question ids before anything is computed, so the
mixture's changes pair with the base model record by record, exactly as the seven sets' did.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from experiments.common import RESULTS

HERE = RESULTS / "mixture"  # its reports (this script is experiments/mixture)

TRANSFER = HERE.parent / "transfer"
PARTS = {"S1": "train-1-champ", "S2": "train-2-alpaca-en-demo"}
WEIGHTS = {"S1": 0.75, "S2": 0.25}  # the measured mixture, M3 of the prediction
TARGET = "math"
REPLICATES = 2000
SEED = 0


def evaluate(model_dir: str) -> None:
    """The tuned mixture on the transfer's reference records (`content.py` rebuilds and checks them)."""
    from experiments.content import content

    content.evaluate(model_dir, content.records("transfer"), HERE / "eval-tuned-reference")


def _per_record(where: Path) -> dict[tuple[str, str], float]:
    with open(where / "predictions.csv") as f:
        return {(r["domain"], r["question_id"]): float(r["cot_nll"]) for r in csv.DictReader(f) if r["cot_nll"]}


def _gains(tuned: Path, base: dict[tuple[str, str], float]) -> dict[str, np.ndarray]:
    """Per domain, each record's cot_nll gained (base minus tuned, nats/token), in base's record order."""
    t = _per_record(tuned)
    out: dict[str, list[float]] = {}
    for key, b in base.items():
        out.setdefault(key[0], []).append(b - t[key])
    return {d: np.array(v) for d, v in sorted(out.items())}


def _interval(x: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    means = x[rng.integers(0, len(x), (REPLICATES, len(x)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def analyse() -> None:
    base = _per_record(TRANSFER / "eval-base-reference")
    gains = {"M3": _gains(HERE / "eval-tuned-reference", base)}
    gains |= {k: _gains(TRANSFER / v / "eval-tuned-reference", base) for k, v in PARTS.items()}
    measured = {k: {d: float(x.mean()) for d, x in g.items()} for k, g in gains.items()}
    with open(HERE / "predict" / "sts.csv") as f:
        pred = {r["domain"]: r for r in csv.DictReader(f)
                if r["candidate"].startswith("0.75 ") and r["metric"] == "cot_nll" and r["change"]}
    domains = sorted(pred)
    rng = np.random.default_rng(SEED)
    # Q1: did the predicted best option (M3) win for the target against each of its parts?
    wins = {}
    for k in PARTS:
        diff = gains["M3"][TARGET] - gains[k][TARGET]  # paired by record (same base)
        low, high = _interval(diff, rng)
        wins[k] = {"difference": float(diff.mean()), "low": low, "high": high}
    ranking = sorted(measured, key=lambda k: -measured[k][TARGET])
    # Q2: the calibrated 90% intervals and calls printed for M3, against its measured changes
    rows = []
    for d in domains:
        p, m = pred[d], measured["M3"][d]
        low, high = float(p["low"]), float(p["high"])
        interp = sum(WEIGHTS[k] * measured[k][d] for k in PARTS)
        rows.append({"domain": d, "measured": m, "ci": _interval(gains["M3"][d], rng), "predicted": float(p["change"]),
                     "low": low, "high": high, "inside": low <= m <= high, "call": p["call"],
                     "own": float(p["own"]), "interpolated": interp,
                     "parts": {k: measured[k][d] for k in PARTS}})
    called = [r for r in rows if r["call"] != "no clear effect"]
    right = [r for r in called if (r["measured"] > 0) == (r["call"] == "helps")]
    rmse = {name: float(np.sqrt(np.mean([(r[name] - r["measured"]) ** 2 for r in rows])))
            for name in ("predicted", "interpolated")}
    grad = grad_prediction(measured)
    result = {"grad": grad, "target": TARGET, "measured": measured, "ranking": ranking, "wins": wins,
              "won": all(w["difference"] > 0 for w in wins.values()),
              "clear": all(w["low"] > 0 for w in wins.values()),
              "coverage": sum(r["inside"] for r in rows) / len(rows), "calls": len(called), "calls_right": len(right),
              "rmse": rmse, "rows": rows}
    (HERE / "mixture.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "MIXTURE.md").write_text(report(result))
    print(report(result))


def grad_prediction(measured: dict[str, dict[str, float]]) -> dict | None:
    """The addendum's report-only lines: the new default's (grad) prediction in `predict-grad/`,
    made before training, against the measured changes of M3 and its parts."""
    path = HERE / "predict-grad" / "sts.csv"
    if not path.is_file():
        return None
    names = {"M3": lambda c: c.startswith("0.75 "), "S1": lambda c: c == "embedded:champ",
             "S2": lambda c: c.endswith("alpaca_en_demo.json") and not c[0].isdigit()}
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "cot_nll" and r["change"]]
    by = {k: {r["domain"]: r for r in rows if match(r["candidate"])} for k, match in names.items()}
    order = {"calibrated": sorted(by, key=lambda k: -float(by[k][TARGET]["change"])),
             "own": sorted(by, key=lambda k: -float(by[k][TARGET]["own"])),
             "measured": sorted(by, key=lambda k: -measured[k][TARGET])}
    m3 = [(d, r) for d, r in by["M3"].items() if d in measured["M3"]]
    inside = [d for d, r in m3 if float(r["low"]) <= measured["M3"][d] <= float(r["high"])]
    called = [(d, r) for d, r in m3 if r["call"] != "no clear effect"]
    right = [d for d, r in called if (measured["M3"][d] > 0) == (r["call"] == "helps")]
    rmse = float(np.sqrt(np.mean([(float(r["change"]) - measured["M3"][d]) ** 2 for d, r in m3])))
    width = float(np.median([float(r["high"]) - float(r["low"]) for _, r in m3]))
    return {"order": order, "coverage": len(inside) / len(m3), "domains": len(m3), "calls": len(called),
            "calls_right": len(right), "rmse": rmse, "median_width": width}


def report(r: dict) -> str:
    m = r["measured"]
    lines = ["# The measured mixture: results", "",
             "Generated by `mixture.py analyse` (see PREREGISTRATION.md for the questions, fixed before training). "
             "Changes: cot_nll gained on the transfer experiment's reference records (nats/token, positive = better), "
             f"base model = the transfer's; 95% intervals by resampling records ({REPLICATES} replicates, "
             f"seed {SEED}).",
             "", f"## Q1: did the predicted best option win for {r['target']}?", "",
             "| option | measured change on " + r["target"] + " |", "|---|---|"]
    names = {"M3": "M3 = 0.75 CHAMP + 0.25 Alpaca (predicted best, by the own part)", "S1": "S1 = CHAMP",
             "S2": "S2 = Alpaca"}
    lines += [f"| {names[k]} | {m[k][r['target']]:+.4f} |" for k in r["ranking"]]
    lines += ["", *[f"- M3 minus {k}: {w['difference']:+.4f} [{w['low']:+.4f}, {w['high']:+.4f}] (paired by record)"
                    for k, w in r["wins"].items()],
              "", f"**Won: {'yes' if r['won'] else 'no'}; clearly (both intervals above zero): "
                  f"{'yes' if r['clear'] else 'no'}.**", "",
              "## Q2: the calibrated intervals printed for M3 (rel-act, M0: the domain means of the five "
              "library sets left after CHAMP and Alpaca)", "",
              "| domain | measured [95%] | predicted | 90% interval | inside | call | own part (z) | "
              "interpolated parts |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['domain']} | {x['measured']:+.4f} [{x['ci'][0]:+.4f}, {x['ci'][1]:+.4f}] | "
                     f"{x['predicted']:+.3f} | [{x['low']:+.3f}, {x['high']:+.3f}] | "
                     f"{'yes' if x['inside'] else 'no'} | {x['call']} | {x['own']:+.2f} | {x['interpolated']:+.4f} |")
    lines += ["", f"- coverage of the 90% intervals: {r['coverage']:.0%} of {len(r['rows'])} domains",
              f"- calls (helps / hurts) with the measured sign: {r['calls_right']} of {r['calls']}",
              f"- RMS error over the domains: calibrated prediction {r['rmse']['predicted']:.4f}, "
              f"interpolation of the parts' measured changes {r['rmse']['interpolated']:.4f}", ""]
    g = r.get("grad")
    if g:
        lines += ["## Addendum (report only): the new default `grad`'s prediction, made before training", "",
                  f"- order on {r['target']}: measured {' > '.join(g['order']['measured'])}; `grad`'s calibrated "
                  f"changes {' > '.join(g['order']['calibrated'])}; its own part {' > '.join(g['order']['own'])}",
                  f"- coverage of `grad`'s 90% intervals for M3: {g['coverage']:.0%} of {g['domains']} domains "
                  f"(median width {g['median_width']:.3f} nats/token)",
                  f"- its calls (helps / hurts) for M3 with the measured sign: {g['calls_right']} of {g['calls']}",
                  f"- RMS error over the domains for M3: {g['rmse']:.4f}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["evaluate"] and len(sys.argv) == 3:
        evaluate(sys.argv[2])
    elif sys.argv[1:] == ["analyse"]:
        analyse()
    else:
        sys.exit(__doc__)
