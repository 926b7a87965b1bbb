#!/usr/bin/env bash
# The ground truth of PREREGISTRATION.md, exactly as pre-registered (resumable: a rerun verifies and
# reuses the finished stages). Run from the repository root with ../shared beside it:
#   nohup bash docs/results/beyond/run.sh > beyond.log 2>&1 &
set -euo pipefail
D=../shared/data
exec .venv/bin/sts validate --out docs/results/beyond \
  --train "$D/mmlu_pro_cot_train.jsonl#category=engineering" \
  --train "$D/math500_test.jsonl#rows=100:200" \
  --train "$D/alpaca_en_demo.json#rows=100:200" \
  --exclude $D/mmlu_pro_test.jsonl --domain-demos $D/mmlu_pro_cot_demos.jsonl \
  --reference $D/mmlu_pro_cot_train.jsonl --reference-examples 100 \
  --max-train 100 --predict-examples 100 --k 400 --demos 2 --max-steps 60 --ft-batch-size 4 --seed 0 \
  --score grad --metric cot_nll --no-question-evaluation --no-sft-shift --gradients
