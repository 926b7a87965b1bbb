#!/usr/bin/env bash
# The pre-registered runs of issues 53 and 54, one heavy job at a time, in the issues' order; every
# stage is resumable, so after a session ends the same command carries on where it stopped:
#   nohup nice bash experiments/queue.sh > queue.log 2>&1 &
# Run from the repository root with ../shared beside it. Commit each finished stage's outputs.
set -euo pipefail
PY=.venv/bin/python
$PY -m experiments.seeds.seeds run                      # issue 53, item 1(b): four second seeds
$PY -m experiments.seeds.seeds analyse
$PY -m experiments.content_round.data build             # the round's derived files (out/, from ../shared)
$PY -m experiments.content_round.data check
bash docs/results/content-round/run.sh                  # issue 53: the content round's seven fine-tunes
$PY -m experiments.seeds.seeds control                  # the control's second seed (the residual's ceiling)
$PY -m experiments.content_round.candidates run         # its gradient and text candidates
$PY -m experiments.content_round.candidates sae         # its shipped and SAE candidates
$PY -m experiments.select.pool build                    # issue 54: the selection round
$PY -m experiments.select.run choose
$PY -m experiments.select.run train
