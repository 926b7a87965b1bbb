#!/usr/bin/env bash
# The pre-registered runs of issues 53 and 54, one heavy job at a time; every stage is resumable, so
# after a session ends the same command carries on where it stopped:
#   nohup nice bash experiments/queue.sh > queue.log 2>&1 &
# Run from the repository root with ../shared beside it. Commit each finished stage's outputs.
# (Issue 53's second seeds are done: `python -m experiments.seeds.seeds run` reruns them.)
# Order: what reads no truth first (the content round's candidates, the selection round's choices,
# which fix every selection before any fine-tune and measure `sts select` cold on the 1,100-example
# pool), then the fine-tunes, issue 53's before issue 54's.
set -euo pipefail
PY=.venv/bin/python
$PY -m experiments.content_round.data build             # issue 53: the round's derived files (out/, from ../shared)
$PY -m experiments.content_round.data check
$PY -m experiments.content_round.candidates run         # its gradient and text candidates (read no truth)
$PY -m experiments.content_round.candidates sae         # its shipped and SAE candidates
$PY -m experiments.select.pool build                    # issue 54: the selection round's pool
$PY -m experiments.select.run choose                    # every selection (and each method's seconds)
bash docs/results/content-round/run.sh                  # issue 53: the content round's seven fine-tunes
$PY -m experiments.seeds.seeds control                  # the control's second seed (the residual's ceiling)
$PY -m experiments.content_round.candidates earlier     # the candidates on the 13 earlier sets (a report)
$PY -m experiments.content_round.analyse report          # ROUND.md (the rule waits for benchmarks/content_cost.py's cost.json)
$PY -m experiments.select.run train                     # issue 54: the ten selections' fine-tunes
$PY -m experiments.select.analyse report                # SELECT.md
