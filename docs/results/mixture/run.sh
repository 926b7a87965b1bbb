#!/usr/bin/env bash
# The measured mixture of PREREGISTRATION.md, exactly as pre-registered. Resumable: a finished
# stage (tuned/finetune.json, eval-tuned-reference/) is kept. Run from the repository root with
# ../shared beside it:
#   nohup bash docs/results/mixture/run.sh > mixture.log 2>&1 &
set -euo pipefail
R=docs/results/mixture
D=../shared/data
if [ ! -f $R/tuned/finetune.json ]; then
  time .venv/bin/sts finetune --out $R/tuned \
    --train embedded:champ:0.75 --train $D/alpaca_en_demo.json:0.25 \
    --max-train 100 --max-steps 60 --batch-size 4 --seed 0
fi
if [ ! -f $R/eval-tuned-reference/predictions.csv ]; then
  time .venv/bin/python $R/mixture.py evaluate $R/tuned
fi
.venv/bin/python $R/mixture.py analyse
