#!/usr/bin/env bash
# The pre-registered runs of issues 53 and 54, one heavy job at a time, in the issues' order; every
# stage is resumable, so after a session ends the same command carries on where it stopped:
#   nohup nice bash experiments/queue.sh > queue.log 2>&1 &
# Run from the repository root with ../shared beside it. Commit each finished stage's outputs.
# (Issue 53's second seeds are done: `python -m experiments.seeds.seeds run` reruns them.)
set -euo pipefail
PY=.venv/bin/python
$PY -m experiments.content_round.data build             # issue 53: the round's derived files (out/, from ../shared)
$PY -m experiments.content_round.data check
$PY -m experiments.content_round.candidates run         # its gradient and text candidates (read no truth)
$PY -m experiments.content_round.candidates sae         # its shipped and SAE candidates
bash docs/results/content-round/run.sh                  # the content round's seven fine-tunes
$PY -m experiments.seeds.seeds control                  # the control's second seed (the residual's ceiling)
$PY -m experiments.content_round.analyse report          # ROUND.md (the rule waits for benchmarks/content_cost.py's cost.json)
$PY -m experiments.select.pool build                    # issue 54: the selection round
$PY -m experiments.select.run choose
$PY -m experiments.select.run train
$PY -m experiments.select.analyse report                # SELECT.md
