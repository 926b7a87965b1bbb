#!/usr/bin/env bash
# The held-out round of PREREGISTRATION.md, exactly as pre-registered (sets 1-3; set 4 only if
# time allows: append its --train and rerun, the finished stages are reused).
# Run from the repository root with ../shared beside it:
#   nohup bash docs/results/heldout/run.sh > heldout.log 2>&1 &
set -euo pipefail
D=../shared/data
exec .venv/bin/sts validate --out docs/results/heldout \
  --train "$D/mmlu_pro_cot_train.jsonl#category=computer science" \
  --train "$D/mmlu_pro_cot_train.jsonl#category=history" \
  --train "$D/math500_test.jsonl#rows=400:500" \
  --exclude $D/mmlu_pro_test.jsonl --domain-demos $D/mmlu_pro_cot_demos.jsonl \
  --reference $D/mmlu_pro_cot_train.jsonl --reference-examples 100 \
  --max-train 100 --predict-examples 100 --k 400 --demos 2 --max-steps 60 --ft-batch-size 4 --seed 0 \
  --score rel-act --metric cot_nll --no-question-evaluation --no-sft-shift --gradients
