#!/usr/bin/env bash
# The content round's ground truth, exactly as PREREGISTRATION.md fixes it (resumable: a rerun
# verifies and reuses the finished stages). Run from the repository root with ../shared beside it,
# after `python -m experiments.content_round.data build` (the derived files under out/):
#   nohup nice bash docs/results/content-round/run.sh > content-round.log 2>&1 &
# `python -m experiments.content_round.data check` builds the same plan and checks its records.
set -euo pipefail
D=../shared/data
R=out/content-round/data
exec .venv/bin/sts validate --out docs/results/content-round \
  --train $R/control.jsonl \
  --train "$D/mmlu_pro_cot_train.jsonl#category=engineering" \
  --train "$D/math500_test.jsonl#rows=100:200" \
  --train "$D/alpaca_en_demo.json#rows=100:200" \
  --train $R/physics.jsonl --train $R/biology.jsonl --train $R/math.jsonl \
  --exclude $D/mmlu_pro_test.jsonl --domain-demos $D/mmlu_pro_cot_demos.jsonl \
  --reference $R/references.jsonl --reference-examples 100 --probes $R/probes.jsonl \
  --max-train 100 --predict-examples 100 --k 400 --demos 2 --max-steps 60 --ft-batch-size 4 --seed 0 \
  --score grad --metric cot_nll_content --no-question-evaluation --no-sft-shift --gradients
