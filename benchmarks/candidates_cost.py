"""Cold time of each score past the first step against `grad`'s, side by side in one run (issue 40's
cost rule: a candidate over 3x `grad`'s cold time is an option, not the default).

"Cold" as the rule reads it: a user's own 100 examples (CHAMP's problems 101-200, nothing of them
shipped or cached) with the domain side already there, as it ships for the gradient scores. Each
score gets a fresh cache; a first run on two other problems fills what does not depend on the
training set (the model checkpoint, the domains' gradient sides or their losses at the start),
then the timed run computes everything of the user's set.

- on the shipped domains (`embedded:mmlu-pro-cot`, sealed): grad, grad-adam, grad-sign, look-fo;
- on reference records with their text (line, look need it; `--domains` a file of the ten measured
  categories' shipped probe records, written from ../shared/data, the same records): every score.

    python benchmarks/candidates_cost.py [--steps 2,5,10] [--line-steps 10,60] [--only grad,look] [--json F]

With `--json F` each row is written to F as it is measured and a rerun measures only the rows F
lacks: about 75 minutes in all on 2 cores, so a session's end keeps what was measured (run it with
nothing else on the machine, in one session or several).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "sts"
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OWN = "embedded:champ#rows=100:200"
WARM = "embedded:champ#rows=200:202"
SEALED = ("grad", "grad-adam", "grad-sign", "look-fo")
TEXT = ("line", "look", "grad", "grad-sign", "look-fo")  # the two that need the text first: the rule reads them


def reference_file(folder: Path) -> Path:
    """The ten measured categories' shipped probe records, with their text (from ../shared/data)."""
    drawn = json.loads((ROOT / "docs" / "results" / "probes" / "probes.json").read_text())["probes"]
    rows = {}
    for name in ("mmlu_pro_cot_train.jsonl", "mmlu_pro_cot_refs.jsonl"):
        with open(SHARED / name, encoding="utf-8") as lines:  # not splitlines(): the text holds U+2028
            for line in lines:
                r = json.loads(line)
                rows[str(r["question_id"])] = r
    measured = ("math", "physics", "other", "psychology", "biology", "business", "engineering", "philosophy",
                "computer science", "history")
    path = folder / "references.jsonl"
    path.write_text("".join(json.dumps(rows[u]) + "\n" for d in measured for u in drawn[d][:10]))
    return path


def timed(score: str, steps: int | None, domains: str | None, folder: Path, warm: str = WARM,
          explain: bool = False) -> float:
    """Seconds of a cold `sts predict --score S` on OWN: a fresh cache, and a first run on `warm`
    (other examples) to fill what no training set changes. `explain` keeps the SAE's explanation
    (for a score that reads those features itself, and so always pays for them)."""
    cache = tempfile.mkdtemp(dir=folder)
    env = os.environ | {"STS_CACHE": cache}
    extra = ["--score", score, *([] if explain else ["--no-explain"]), *(["--steps", str(steps)] if steps else []),
             *(["--domains", domains] if domains else [])]
    for train in (warm, OWN):  # the first fills what no training set changes; the second is timed
        start = time.perf_counter()
        subprocess.run([str(BIN), "predict", "--train", train, "--out", str(folder / "out"), *extra], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def save(out: Path, records: list[dict]) -> None:
    """The rows so far, written whole under a temporary name and renamed."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"command": "python benchmarks/candidates_cost.py " + " ".join(sys.argv[1:]),
                               "cpus": os.cpu_count(), "train": OWN, "rows": records}, indent=1) + "\n")
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", default="2,5,10", help="look and look-fo's step counts (the round's look-k)")
    parser.add_argument("--line-steps", default="10,60", help="line's step counts (the round's line-k)")
    parser.add_argument("--only", default="")
    parser.add_argument("--json", default="", help="also write the rows here (docs/results/beyond/cost.json)")
    args = parser.parse_args()
    steps = {"look": [int(s) for s in args.steps.split(",")], "line": [int(s) for s in args.line_steps.split(",")]}
    steps["look-fo"] = steps["look"]
    only = set(filter(None, args.only.split(",")))
    out = Path(args.json) if args.json else None
    records: list[dict] = json.loads(out.read_text())["rows"] if out and out.is_file() else []
    rows = [(r["side"], r["score"] + (f" --steps {r['steps']}" if r["steps"] else ""), r["seconds"]) for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        refs = str(reference_file(folder)) if SHARED.is_dir() else None
        for where, scores, domains in (("shipped domains", SEALED, None), ("reference records", TEXT, refs)):
            if where == "reference records" and refs is None:
                print("reference records: skipped (../shared/data is absent)")
                continue
            for score in scores:
                if only and score not in only:
                    continue
                for k in steps.get(score, [None]):
                    if any((r["side"], r["score"], r["steps"]) == (where, score, k) for r in records):
                        continue  # measured by an earlier run into the same --json
                    seconds = timed(score, k, domains, folder)
                    rows.append((where, score + (f" --steps {k}" if k else ""), seconds))
                    records.append({"side": where, "score": score, "steps": k, "seconds": round(seconds, 1)})
                    print(f"{where:18s} {rows[-1][1]:22s} {seconds:7.1f} s", flush=True)
                    if out:
                        save(out, records)
    base = {w: s for w, name, s in rows if name == "grad"}
    print(f"\ncold time of a user's 100 examples ({OWN}) on {os.cpu_count()} CPUs; ratio to grad's on the same side")
    print("| domain side | score | seconds | / grad |\n|---|---|---|---|")
    for where, name, seconds in rows:
        ratio = f"{seconds / base[where]:.2f}" if where in base else "-"
        print(f"| {where} | `{name}` | {seconds:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
