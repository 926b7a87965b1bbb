"""The named choices shared by the library and the command line, typed once.

Each is a `StrEnum`: its members compare equal to their strings (`Score.ACT == "act"`), so
configs written as JSON, cache keys and user code passing plain strings are unchanged, and
typer lists the same values in `--help` and rejects others. `parse` turns a user's string
into a member with one error line that lists the valid values.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from sts.errors import UserError

E = TypeVar("E", bound=StrEnum)


class Method(StrEnum):
    """How the training set's feature shift is read (DESIGN: icl, sft, paper)."""

    ICL = "icl"  # the training examples with vs without in-context demonstrations
    SFT = "sft"  # the base vs the fine-tuned model on the same tokens
    PAPER = "paper"  # the reference's index-aligned dense streams
    DATA = "data"  # the training responses vs the base model's own responses to the same prompts


class Score(StrEnum):
    """A domain score over the shifted features, or a baseline that ignores the SAE."""

    ACT = "act"  # STS_act
    ICL = "icl"  # STS_ICL
    SQ = "sq"  # the reference notebook's
    REL_ACT = "rel-act"  # STS_act made scale-free (docs/results/transfer/ADDENDUM.md)
    REL_ICL = "rel-icl"  # STS_ICL made scale-free
    RAW_ACT = "raw-act"
    RAW_SQ = "raw-sq"
    COSINE = "cosine"
    LEXICAL = "lexical"
    GRAD = "grad"  # <G, g_D>: the first-order loss change of one SGD step (sts.engine.gradients)
    GRAD_ADAM = "grad-adam"  # the same for Adam's first step
    GRAD_SIGN = "grad-sign"  # the same for Adam's first update that moves: sign(G) (sts.engine.gradients.first_update)
    LINE = "line"  # the loss drop along that update, k steps out (sts.engine.lookahead)
    LOOK = "look"  # the loss drop after k real optimizer steps (sts.engine.lookahead)
    LOOK_FO = "look-fo"  # that k-step displacement against the domain's gradient side (first order)


# The paper's protocol correlates over the 4 domains with the largest and the 4 with the smallest
# absolute change (chosen from the outcome).
PAPER_DOMAINS = 8


class Tokens(StrEnum):
    ALL = "all"
    RESPONSE = "response"  # the response part of chat examples


class Readout(StrEnum):
    SAE = "sae"  # SAE features
    RAW = "raw"  # the hooked layer's residual dimensions (raw-* and cosine baselines)


class Responses(StrEnum):
    DATASET = "dataset"  # each record's own response
    GENERATED = "generated"  # the base model's answer to each prompt


class Mode(StrEnum):
    """`sts evaluate`'s ways of scoring a question."""

    MC = "mc"  # option-letter log-likelihood
    COT = "cot"  # generate, then MMLU-Pro's answer extraction
    REFERENCE = "reference"  # cot_nll of reference chains of thought only


class Metric(StrEnum):
    """Ground truths a fine-tuning run's per-domain change is measured in."""

    ACC = "acc"
    NLL = "nll"
    ACC_NORM = "acc_norm"
    P_CORRECT = "p_correct"
    COT_NLL = "cot_nll"
    # cot_nll over the reference's content only: MMLU-Pro's templated opening ("Let's think step
    # by step. We refer to Wikipedia articles on ... for help.") is context, not scored
    COT_NLL_CONTENT = "cot_nll_content"

    @property
    def gain(self) -> float:
        """A change after fine-tuning = gain x (tuned - base): points for the accuracies and the
        probability, a gain in nats/token (base - tuned) for the NLLs."""
        return 100.0 if self.is_share else -1.0

    @property
    def units(self) -> str:
        return "points" if self.is_share else "nats/token gained"

    @property
    def is_share(self) -> bool:
        """An accuracy or a probability (higher is better), not a negative log-likelihood."""
        return self in (Metric.ACC, Metric.ACC_NORM, Metric.P_CORRECT)


# The metrics measured on `sts validate --reference` records (chains of thought), not on questions
REFERENCE_METRICS = (Metric.COT_NLL, Metric.COT_NLL_CONTENT)


class Protocol(StrEnum):
    """Which domains and which sign of change a correlation uses; `note` says it in words."""

    note: str

    def __new__(cls, value: str, note: str) -> Protocol:
        member = str.__new__(cls, value)
        member._value_ = value
        member.note = note
        return member

    SIGNED = "signed", "all domains, signed accuracy change"
    ABS = "abs", "all domains, absolute accuracy change"
    PAPER = "paper", (f"absolute accuracy change on the {PAPER_DOMAINS // 2} domains with the largest and the "
                      f"{PAPER_DOMAINS // 2} with the smallest absolute change, as the paper did; this choice "
                      "of domains uses the outcome")


class ReportTo(StrEnum):
    """Where the fine-tuning trainer logs; each but `none` needs the package of its name."""

    NONE = "none"
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"

    @property
    def package(self) -> str | None:
        return None if self is ReportTo.NONE else self.value


class Format(StrEnum):
    """What `sts extract` writes."""

    STATS = "stats"  # per-feature sufficient statistics (safetensors)
    PT = "pt"  # dense [tokens, d_sae] features, the reference's format


class Architecture(StrEnum):
    TOPK = "topk"
    JUMPRELU = "jumprelu"


def parse(kind: type[E], value: str | E, what: str) -> E:
    """`value` as a member of `kind`, or a UserError naming `what` and the valid values."""
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"unknown {what} {value!r}; use one of {', '.join(kind)}") from None
