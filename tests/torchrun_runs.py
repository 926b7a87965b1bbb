"""Several `sts` runs in the processes of one launch.

    torchrun --nproc-per-node 2 tests/torchrun_runs.py RUNS.json   # RUNS: [{"cache": STS_CACHE, "argv": [...]}]

Each process runs them in order, as a notebook calls `sts.predict` again and again; before each the
main process (the one that reports) writes "sts-test: run N" to its stdout and stderr, so a test
reads each run's account apart. Tests launch this rather than `torchrun -m sts` once a run because
every launch starts two processes that import torch, transformers, peft and sae_lens anew (seconds
each on two cores); one test launches `torchrun -m sts` itself."""

from __future__ import annotations

import json
import os
import sys

from sts.cli import main

if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        runs = json.load(fh)
    for n, run in enumerate(runs):
        os.environ["STS_CACHE"] = run["cache"]
        if os.environ.get("RANK", "0") == "0":  # the process that reports: its own stream is in order
            print(f"sts-test: run {n}", flush=True)
            print(f"sts-test: run {n}", file=sys.stderr, flush=True)
        code = main(run["argv"])
        sys.stdout.flush()  # this run's account before the next one's marker
        sys.stderr.flush()
        if code:
            sys.exit(code)
