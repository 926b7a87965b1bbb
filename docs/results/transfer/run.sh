#!/usr/bin/env bash
# The transfer experiment of docs/results/transfer/PREREGISTRATION.md, exactly as run.
# Resumable: rerun the same command and finished stages are verified and reused.
# Run from the repository root with ../shared beside it:
#   nohup bash docs/results/transfer/run.sh > transfer.log 2>&1 &
set -euo pipefail
D=../shared/data
exec .venv/bin/sts validate --out docs/results/transfer \
  --train embedded:champ \
  --train $D/alpaca_en_demo.json \
  --train "$D/mmlu_pro_cot_train.jsonl#category=physics" \
  --train "$D/mmlu_pro_cot_train.jsonl#category=psychology" \
  --train $D/math500_test.jsonl \
  --train "$D/mmlu_pro_cot_train.jsonl#category=business" \
  --train "$D/mmlu_pro_cot_train.jsonl#category=biology" \
  --exclude $D/mmlu_pro_test.jsonl \
  --domain-demos $D/mmlu_pro_cot_demos.jsonl \
  --reference $D/mmlu_pro_cot_train.jsonl --reference-examples 100 \
  --max-train 100 --predict-examples 100 --eval-examples 100 \
  --k 100 --demos 2 --max-steps 60 --ft-batch-size 4 --seed 0 \
  --score act --metric nll --protocol signed
