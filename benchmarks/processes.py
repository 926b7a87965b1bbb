"""`sts predict` as one process and as N processes under torchrun, side by side in one run (issue 43):
the same command, a cold cache each time, wall seconds, and whether the scores agree.

The command is the validated form's cold cost on the embedded default: a user's own training set
(CHAMP's problems 101-100+N, nothing of them shipped) against the shipped reference domains,
`--score grad --no-explain`, so the work is the training side's backward passes, the part the
processes share; `--explain` adds the SAE explanation (the training set's shift), which they share
too. One process runs with all the machine's threads; N processes with
threads / N each (torchrun's OMP_NUM_THREADS), so both use the same cores.

    python benchmarks/processes.py [--examples 40] [--processes 2] [--explain]
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


def run(processes: int, threads: int, examples: int, work: Path, explain: bool) -> tuple[float, dict[str, float]]:
    """Wall seconds and scores of one cold `sts predict`."""
    out, cache = work / f"out-{processes}", work / f"cache-{processes}"
    argv = ["predict", "--train", f"embedded:champ#rows=100:{100 + examples}", "--score", "grad",
            *([] if explain else ["--no-explain"]),
            "--out", str(out)]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
              if processes > 1 else [sys.executable])
    env = os.environ | {"STS_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run([*launch, "-m", "sts", *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return seconds, json.loads((out / "sts.json").read_text())["scores"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--explain", action="store_true", help="with the SAE explanation (default: --no-explain)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        one, scores_one = run(1, cores, args.examples, Path(tmp), args.explain)
        many, scores_many = run(args.processes, max(1, cores // args.processes), args.examples, Path(tmp),
                                 args.explain)
    worst = max(abs(scores_many[d] - s) / (abs(s) + 1e-12) for d, s in scores_one.items())
    form = "(with the explanation)" if args.explain else "--no-explain"
    print(f"{cores} cores; {args.examples} training examples, cold, --score grad {form}")
    print(f"1 process x {cores} threads: {one:.1f} s")
    print(f"{args.processes} processes x {max(1, cores // args.processes)} threads: {many:.1f} s")
    print(f"ratio (1 process / {args.processes}): {one / many:.2f}x; largest relative score difference {worst:.1e}")


if __name__ == "__main__":
    main()
