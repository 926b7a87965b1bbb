"""Scoring: shifted features S and a score per domain (formulas in shared/DESIGN.md).

    shift_j = sum_t (shifted[t, j] - base[t, j])^2
    S       = the k features with the largest shift, largest first

and, per domain D, one of the registered scores (`REGISTRY`, one `ScoreSpec` each: its
formula, its `Kind` (what it reads of an `Extraction` and how it scores it), readout, per-feature
domain value, reduction over S, and whether it is relative): the
paper's STS_act and STS_ICL, the reference notebook's mean f^2, scale-free versions of STS_act
and STS_ICL, and baselines that need no SAE (raw residual dimensions instead of features,
residual cosine, TF-IDF cosine). Every score over S is a reduction over S of one per-feature
number of D's statistics, so one extraction serves them all. `score_stats` computes any of
them from statistics; `sts score` (files) and `sts predict` (an extraction) both call it. The
same formulas serve the reference's dense `.pt` tensors (method `paper`, rows aligned by index,
first N rows).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sts import defaults
from sts.choices import REFERENCE_K, REFERENCE_SCORE, Method, Readout, Score, parse
from sts.errors import UserError, check_positive, no_tokens
from sts.stats import FeatureStats, PairedStats, Stats, load_stats

if TYPE_CHECKING:
    from sts.data import DomainDemos, Example
    from sts.gradients import GradientStats

# --- what a score is -------------------------------------------------------------------------

# [width] from a domain's statistics: its single run (FeatureStats), or for a domain_demos
# score its run with and without its demonstrations (PairedStats)
DomainValue = Callable[[Any], torch.Tensor]


def mean_activation(st: FeatureStats) -> torch.Tensor:
    """mean f over the counted tokens."""
    return st.sum / st.count


def mean_square(st: FeatureStats) -> torch.Tensor:
    """mean f^2 over the counted tokens."""
    return st.sum_sq / st.count


@dataclass
class Extraction:
    """Everything the scores read, extracted once (`sts.prediction.extract_all`): the training
    set's shift statistics and each domain's statistics per readout, the domains' ICL pairs
    (icl score), the texts (lexical), the gradient sides and the lookahead's loss drops. `sts
    validate` scores every variant from one Extraction; a `Kind` says which parts a score reads."""

    hook: str
    shift: dict[str, PairedStats]  # readout -> the training set's paired statistics
    domains: dict[str, dict[str, FeatureStats]]  # readout -> domain -> single-run statistics
    domain_icl: dict[str, PairedStats]  # domain -> paired statistics with its demonstrations
    texts: tuple[str, dict[str, str]] | None  # training text, domain -> text (lexical)
    questions: dict[str, int]
    demos: DomainDemos | None = None
    gradients: GradientStats | None = None  # the gradient scores' (sts.gradients)
    lookahead: dict[str, dict[str, float]] = field(default_factory=dict)  # score -> domain -> loss drop (line, look...)


# What a kind of score can read of an Extraction; `sts.prediction.extract_all` extracts the union
# of what the asked scores read, and nothing else.
READS = ("statistics", "texts", "gradients", "lookahead")


@dataclass(frozen=True)
class Kind:
    """A family of scores: what they read and how one of them scores an Extraction. `compute`
    gets the score's spec, the extraction and k (the number of shifted features), and returns a
    `ScoreOutput`. `reads` (a subset of READS): statistics (the training shift and the domains'
    statistics of the score's `readout`), texts, gradients (the LoRA gradient sides of
    `sts.gradients`), lookahead (the run's first steps, `sts.lookahead`). `counts`: what
    `ScoreOutput.tokens` counts per domain (the report's column). `mixes`: a mixture of training
    sets' extractions gives the score (`sts.compare`); a text or a run of one set has no mixture."""

    name: str
    compute: Callable[[ScoreSpec, Extraction, int], ScoreOutput]
    reads: frozenset[str]
    counts: str = "tokens"

    def __post_init__(self) -> None:
        unknown = set(self.reads) - set(READS)
        if unknown or not self.reads:
            raise ValueError(f"kind {self.name!r} reads {sorted(unknown) or 'nothing'}; it reads some of {READS}")

    @property
    def run_based(self) -> bool:
        """Reads the LoRA run's loss on the domain records (gradients, lookahead): no SAE, and a
        backward pass per example."""
        return bool(self.reads & {"gradients", "lookahead"})

    @property
    def mixes(self) -> bool:
        return not self.reads & {"texts", "lookahead"}


def _features(spec: ScoreSpec, x: Extraction, k: int) -> ScoreOutput:
    readout = spec.readout or Readout.SAE
    return score_stats(spec.name, x.shift[readout], x.domains.get(readout, {}), x.domain_icl, k)


def _cosine(spec: ScoreSpec, x: Extraction, k: int) -> ScoreOutput:
    readout = spec.readout or Readout.RAW
    singles = x.domains.get(readout, {})
    return ScoreOutput(cosine_scores(x.shift[readout].a, singles), {d: st.count for d, st in singles.items()})


def _lexical(spec: ScoreSpec, x: Extraction, k: int) -> ScoreOutput:
    if x.texts is None:
        raise UserError(f"the {spec.name} score needs the texts; extract with it")
    train_text, domain_texts = x.texts
    return ScoreOutput(lexical_scores(train_text, domain_texts), dict.fromkeys(domain_texts, 0))


def _gradient(spec: ScoreSpec, x: Extraction, k: int) -> ScoreOutput:
    if x.gradients is None:
        raise UserError(f"the {spec.name} score needs the gradients; extract with it")
    return ScoreOutput(x.gradients.scores(adam=spec.direction == "adam", sign=spec.direction == "sign"),
                       dict(x.gradients.records))


def _lookahead(spec: ScoreSpec, x: Extraction, k: int) -> ScoreOutput:
    if spec.name not in x.lookahead:
        raise UserError(f"the {spec.name} score needs the lookahead; extract with it")
    return ScoreOutput(dict(x.lookahead[spec.name]), dict.fromkeys(x.lookahead[spec.name], 0))


FEATURES = Kind("features", _features, frozenset({"statistics"}))  # a per-feature domain value reduced over S
COSINE = Kind("cosine", _cosine, frozenset({"statistics"}))  # residual means, training set vs domain
LEXICAL = Kind("lexical", _lexical, frozenset({"texts"}))
GRADIENT = Kind("gradient", _gradient, frozenset({"gradients"}), counts="records")
LOOKAHEAD = Kind("lookahead", _lookahead, frozenset({"lookahead"}), counts="records")


@dataclass(frozen=True)
class ScoreSpec:
    """One score, whole: registered (`register`), every verb, the CLI's choices and the reports
    read it from `REGISTRY`. `kind` (a `Kind`) says what it reads and how it scores: FEATURES
    (reduce a per-feature domain value over the shifted features S), COSINE (residual means of
    the training set and the domain), LEXICAL (texts), GRADIENT, LOOKAHEAD, or a new one. `value`
    reads a domain's statistics: its single run, or with `domain_demos` its paired run with and
    without its own demonstrations. `relative`: S is chosen by the relative shift and
    the domain values are divided by their mean over the scored domains (the rel-* scores).
    `uses_shift`: the score depends on the training set's shifted features (so the sft shift
    gives it too). `dense_power`: on the reference's dense tensors, the mean of f^power.
    `gradient` scores need no SAE: they read the LoRA gradients of `sts.gradients`."""

    name: str
    formula: str
    readout: Readout | None  # what both sides are read on; None: text or gradients
    kind: Kind = FEATURES
    value: DomainValue | None = None
    reduce: str = "sum"  # over S: sum or mean
    domain_demos: bool = False
    relative: bool = False
    baseline: bool = False
    uses_shift: bool = True
    dense_power: int | None = None
    # gradient scores: the training side's direction (G: grad; adam: G / sqrt(v); sign: Adam's first
    # moving update); lookahead scores (`sts.lookahead`): line, look or look-fo
    direction: str = "G"
    label: str = ""  # the axis label of its charts
    validated: str = ""  # what measured fine-tuning runs showed it predicts (one line under its ranking)
    # a gradient score's record where its domain side read answer texts (domains without reference
    # chains of thought): the report quotes the form the prediction used, never the other's
    validated_answers: str = ""

    @property
    def run_based(self) -> bool:
        return self.kind.run_based

    def reads(self, what: str) -> bool:
        """Whether the score reads `what` (one of READS) of an Extraction."""
        return what in self.kind.reads

    @property
    def reads_texts(self) -> bool:
        """Runs the model forward on the domain records themselves (line, look), so a sealed
        domain, whose text does not ship, cannot serve it."""
        return self.reads("lookahead") and self.direction != "look-fo"


def icl_change(st: PairedStats) -> torch.Tensor:
    """mean (f(demos_D, x) - f(x))^2 over the aligned question tokens."""
    return st.sum_sq_diff / st.a.count


# Why the rel-* scores exist: the total squared shift grows with a feature's own scale, so it
# picks features that fire strongly on any text, and a domain's raw usage mixes how much it uses
# a feature with how large that feature's activations are; on the transfer experiment's first
# sets both made the scores nearly the same for every training set (docs/results/transfer/ADDENDUM.md).
_REL = ("S_rel = the k features with the largest sum_t (f_b - f_a)^2 / (sum_t (f_a^2 + f_b^2) + eps)")
BUILTIN: tuple[ScoreSpec, ...] = (
    ScoreSpec(Score.ACT, "STS_act(D) = mean over D's counted tokens t of sum_{j in S} f_j(x_t)",
              Readout.SAE, value=mean_activation, dense_power=1,
              label="STS_act (mean over tokens of the sum of f over S)",
              validated="read on plain questions, over 10 measured sets (docs/results/plain, k 400): what this set "
              "moves more than other training does (specificity +0.54 [+0.52, +0.55], swap +0.34; +0.82 on the "
              "3 held-out sets), not the gains' overall profile (median per-set Pearson -0.15; +0.05)"),
    ScoreSpec(Score.ICL, "STS_ICL(D) = mean over D's counted question tokens of sum_{j in S} "
              "(f_j(demos_D, x) - f_j(x))^2", Readout.SAE, value=icl_change, domain_demos=True,
              label="STS_ICL (mean over tokens of the sum over S of the ICL change squared)"),
    ScoreSpec(Score.SQ, "STS_sq(D) = mean_{j in S} mean_t f_j(x_t)^2 (the reference notebook's score)",
              Readout.SAE, value=mean_square, reduce="mean", dense_power=2,
              label="STS (mean over shifted features of mean f²)"),
    ScoreSpec(Score.REL_ACT, "sum_{j in S_rel} u_Dj, u_Dj = mean_t f_j on D / its mean over the scored domains; "
              + _REL, Readout.SAE, value=mean_activation, relative=True,
              label="scale-free STS_act (sum over S_rel of the domain's mean f / the domains' mean)",
              validated="which domains any chain-of-thought-style training moves (median per-set Pearson +0.42 on "
              "the transfer experiment's reporting half), not what this set moves: specificity -0.17 there, "
              "-0.81 on the held-out round (docs/results/heldout)"),
    ScoreSpec(Score.REL_ICL, "sum_{j in S_rel} u_Dj, u_Dj = mean (f_j(demos_D, x) - f_j(x))^2 on D / its mean "
              "over the scored domains; S_rel as for rel-act", Readout.SAE, value=icl_change, domain_demos=True,
              relative=True,
              label="scale-free STS_ICL (sum over S_rel of the domain's ICL change / the domains' mean)"),
    ScoreSpec(Score.RAW_ACT, "mean over D's counted tokens t of sum_{j in S_raw} r_j(x_t), S_raw = the k residual "
              "dimensions with the largest shift (r: the hooked layer's residual stream)", Readout.RAW,
              value=mean_activation, baseline=True,
              label="raw residual: mean over tokens of the sum over the top-shifted dimensions"),
    ScoreSpec(Score.RAW_SQ, "mean_{j in S_raw} mean_t r_j(x_t)^2, S_raw = the k residual dimensions with the "
              "largest shift", Readout.RAW, value=mean_square, reduce="mean", baseline=True,
              label="raw residual: mean over the top-shifted dimensions of mean r²"),
    ScoreSpec(Score.COSINE, "cos(mean r over the training set's counted tokens, mean r over D's counted tokens)",
              Readout.RAW, kind=COSINE, baseline=True, uses_shift=False,
              label="cosine of mean residuals (training set vs domain)"),
    ScoreSpec(Score.LEXICAL, "cosine of the TF-IDF vectors (scikit-learn TfidfVectorizer fitted on the training "
              "text and every domain's text) of the training text and D's text", None, kind=LEXICAL,
              baseline=True, uses_shift=False,
              label="TF-IDF cosine (training text vs domain text)"),
    ScoreSpec(Score.GRAD, "<G, g_D>: G the mean gradient of the fine-tuning loss over the training set, g_D of D's "
              "ground-truth loss, both on the LoRA adapter at its first step (sts.gradients)", None, kind=GRADIENT,
              baseline=True, uses_shift=False,
              label="first-order loss drop of one SGD step, <G, g_D>",
              validated="with each domain read on 10 reference chains of thought that no evaluation measured (as "
              "shipped; docs/results/probes), over 10 measured sets: which domains this set moves more than other "
              "training would (specificity +0.89; +0.96 on the 3 held-out sets) and the gains' profile (median "
              "per-set Pearson +0.60; +0.59)",
              validated_answers="on answer texts (domains without reference chains of thought) it predicted little, "
              "post hoc over 10 measured sets (specificity +0.11, median per-set Pearson +0.15; "
              "docs/results/heldout/SHIPPED.md): give domains with reference chains of thought"),
    ScoreSpec(Score.GRAD_ADAM, "<G / sqrt(v), g_D>: as grad, the training gradient divided per coordinate by the "
              "root of its mean square over the training examples (Adam's first update)", None, kind=GRADIENT,
              baseline=True, uses_shift=False, direction="adam",
              label="first-order loss drop of Adam's first step, <G/√v, g_D>",
              validated="with each domain read on 10 reference chains of thought that no evaluation measured (as "
              "shipped; docs/results/probes), over 10 measured sets: which domains this set moves more than other "
              "training would (specificity +0.93; +0.96 on the 3 held-out sets) and the gains' profile (median "
              "per-set Pearson +0.49; +0.52)",
              validated_answers="on answer texts (domains without reference chains of thought) it predicted little, "
              "post hoc over 10 measured sets (specificity +0.13, median per-set Pearson +0.11; "
              "docs/results/heldout/SHIPPED.md)"),
)
_RUN = " (the LoRA run of sts finetune's recipe, sts.lookahead)"
BUILTIN += (
    ScoreSpec(Score.GRAD_SIGN, "<u, g_D>, u = c / (|c| + eps), c the training gradient G clipped as the trainer clips "
              "it: Adam's update at its first step that moves (sign(G) wherever |c| >> eps)", None, kind=GRADIENT,
              baseline=True, uses_shift=False, direction="sign",
              label="first-order loss drop of Adam's first moving update, <sign(G), g_D>"),
    ScoreSpec(Score.LINE, "L_D(theta0) - L_D(theta0 - s_k u): D's loss drop where a run that kept Adam's first update "
              "u (grad-sign's) would be after --steps k steps, s_k the recipe's learning rates summed over them"
              + _RUN, None, kind=LOOKAHEAD, baseline=True, uses_shift=False, direction="line",
              label="loss drop along Adam's first update, k steps out"),
    ScoreSpec(Score.LOOK, "L_D(theta0) - L_D(theta_k): D's loss drop after --steps k optimizer steps of the run on the "
              "training set" + _RUN, None, kind=LOOKAHEAD, baseline=True, uses_shift=False, direction="look",
              label="loss drop after k steps of the fine-tuning run"),
    ScoreSpec(Score.LOOK_FO, "<g_D, theta0 - theta_k>: the run's displacement after --steps k optimizer steps against "
              "D's gradient side (first order: runs on the shipped domains, whose texts do not ship)" + _RUN, None,
              kind=LOOKAHEAD, baseline=True, uses_shift=False, direction="look-fo",
              label="first-order loss drop of k steps of the fine-tuning run, <θ0 - θk, g_D>"),
)
REGISTRY: dict[str, ScoreSpec] = {}


def register(spec: ScoreSpec) -> ScoreSpec:
    """Add a score (its name must be new): `sts predict`, `sts validate` (which scores every
    registered score its extraction serves), `sts compare`, the CLI's `--score` choices and the
    reports then run it. A module of scores can register at import; `sts` imports the modules
    named by the `sts.scores` entry-point group before it builds its CLI (`load_plugins`)."""
    if spec.name in REGISTRY:
        raise ValueError(f"a score named {spec.name!r} is registered already")
    if not spec.name or spec.name.startswith("-") or any(c.isspace() or c == "," for c in spec.name):
        raise ValueError(f"score name {spec.name!r}: use a short word without spaces or commas (e.g. my-score)")
    if spec.kind is FEATURES and spec.value is None:
        raise ValueError(f"score {spec.name!r}: a features score needs its per-feature domain value")
    REGISTRY[spec.name] = spec
    return spec


for _spec in BUILTIN:
    register(_spec)


def names(where: Callable[[ScoreSpec], bool] = lambda _s: True) -> tuple[str, ...]:
    """The registered scores for which `where` holds, in the order they were registered (the
    built-in ones first, in the order reports list them)."""
    return tuple(n for n, s in REGISTRY.items() if where(s))


def statistics_scores() -> tuple[str, ...]:
    """What one extraction of SAE / residual statistics and texts gives (no backward pass)."""
    return names(lambda s: not s.run_based)


def gradient_scores() -> tuple[str, ...]:
    """What the gradient sides give (no lookahead run)."""
    return names(lambda s: s.reads("gradients") and not s.reads("lookahead"))


def shift_scores() -> tuple[str, ...]:
    """The scores over the training set's shifted features: the fine-tuned model's shift (sft)
    gives them too."""
    return names(lambda s: s.uses_shift and s.kind.reads == {"statistics"})


def file_scores() -> tuple[str, ...]:
    """What `sts score` computes from statistics files, dense tensors or texts (no model)."""
    return names(lambda s: s.kind in (FEATURES, COSINE, LEXICAL))


def baselines() -> tuple[str, ...]:
    return names(lambda s: s.baseline)


def formulas() -> dict[str, str]:
    return {n: s.formula for n, s in REGISTRY.items()}


def load_plugins() -> list[str]:
    """Import the modules of the `sts.scores` entry-point group (a package's
    `[project.entry-points."sts.scores"]`), whose imports `register` their scores; the names of
    the scores they added. A plugin that fails to import is bad input, said in one line."""
    from importlib.metadata import entry_points

    before = set(REGISTRY)
    for point in entry_points(group="sts.scores"):
        try:
            point.load()
        except Exception as exc:  # any error of a third-party module: said in one line, not a traceback
            raise UserError(f"the score plugin {point.name} ({point.value}) failed to load: "
                            f"{type(exc).__name__}: {exc}; fix or uninstall it") from None
    return [n for n in REGISTRY if n not in before]


EPS_SHARE = 1e-3  # eps of the relative shift, as a share of the mean per-feature base energy


def spec_of(name: str) -> ScoreSpec:
    """The registered score `name`, or a UserError listing the registered ones."""
    if name not in REGISTRY:
        raise UserError(f"unknown --score {name!r}; use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_score(name: str) -> str:
    """A registered score's name: the `Score` member for a built-in one."""
    spec_of(name)
    return Score(name) if name in Score._value2member_map_ else name


def uses_domain_demos(name: str) -> bool:
    """Whether the score reads each domain with and without its demonstrations (icl, rel-icl)."""
    return spec_of(name).domain_demos


_CHUNK = 1024  # rows at a time, so dense scoring holds O(chunk x d_sae) beyond the mmap


@dataclass
class Shift:
    """Per-feature shift and the top-k shifted features."""

    values: torch.Tensor  # [d_sae] float64
    features: list[int]  # indices, largest shift first

    @property
    def d_sae(self) -> int:
        return self.values.shape[0]


def check_k(k: int, d_sae: int) -> None:
    if not 1 <= k <= d_sae:
        raise UserError(f"k must be between 1 and the SAE width {d_sae} (got {k}); change --k")


def top_features(shift: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest shifts, descending; ties broken by the lower index."""
    check_k(k, shift.shape[0])
    # A stable descending sort gives a deterministic order among equal shifts.
    order = torch.sort(shift, descending=True, stable=True).indices
    return order[:k].tolist()


def domain_score(values: torch.Tensor, features: list[int], reduce: str = "mean") -> float:
    """A score over S from one per-feature number of the domain (mean f^2 for `sq`, mean f for
    `act`, mean squared ICL change for `icl`): the mean or the sum over S."""
    picked = values[torch.tensor(features, dtype=torch.long)]
    return float(picked.sum() if reduce == "sum" else picked.mean())


def feature_values(name: str, single: FeatureStats | None = None, paired: PairedStats | None = None,
                   source: str = "") -> torch.Tensor:
    """The per-feature number of a domain that the score `name` reduces over S (before a rel-*
    score makes it relative across domains): its `value` of the single run, or of the paired
    run with the domain's demonstrations (domain_demos scores)."""
    spec = spec_of(name)
    assert spec.value is not None, f"{name} is not a features score"
    if spec.domain_demos:
        if paired is None:
            raise UserError(f"{source}: the {name} score needs the domain's paired statistics (each "
                            "question with and without its domain's demonstrations: `sts extract "
                            "--shift icl --domain-demos SPEC`)")
        if paired.a.count == 0:
            raise no_tokens(f"domain {source}", "no question token stayed aligned with its demonstrations; "
                            "give shorter demonstrations or raise --max-length")
        return spec.value(paired)
    if single is None or single.count == 0:
        raise no_tokens(f"domain {source}", "it is empty; check its data")
    return spec.value(single)


def energy_scale(stats: PairedStats) -> torch.Tensor:
    """[d_sae] float64: sum over the aligned tokens of f_a^2 + f_b^2, plus eps = EPS_SHARE x the
    mean over features of sum f_a^2 (so that a feature firing on a token or two, whose share of
    changed energy is near 1 by chance, does not top the relative shift)."""
    eps = EPS_SHARE * float(stats.a.sum_sq.double().mean())
    return stats.a.sum_sq.double() + stats.b.sum_sq.double() + (eps if eps > 0 else 1.0)


def relative_shift(stats: PairedStats, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The share of each feature's own energy that the shift changes: sum (f_b - f_a)^2 /
    energy_scale (in [0, 1] for non-negative features); `scale`: energy_scale, if computed."""
    return stats.sum_sq_diff.double() / (energy_scale(stats) if scale is None else scale)


def relative_usage(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each domain's per-feature value over its mean across the given domains (0 where that
    mean is 0): how much more than the average domain a domain uses a feature, whatever the
    feature's scale."""
    mean = torch.stack([v.double() for v in values.values()]).mean(0)
    nonzero = mean != 0
    safe = torch.where(nonzero, mean, torch.ones_like(mean))
    return {d: torch.where(nonzero, v.double() / safe, torch.zeros_like(mean)) for d, v in values.items()}


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    """Cosine similarity of two vectors (0 when either is zero)."""
    u, v = u.double(), v.double()
    norm = float(u.norm() * v.norm())
    return float(u @ v) / norm if norm > 0 else 0.0


def lexical_scores(train_text: str, domain_texts: dict[str, str]) -> dict[str, float]:
    """TF-IDF cosine between the training text and each domain's text (scikit-learn's
    defaults: word unigrams, smooth idf, l2-normalised rows), fitted on all of them."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    names = list(domain_texts)
    try:
        matrix = TfidfVectorizer().fit_transform([train_text] + [domain_texts[n] for n in names])
    except ValueError:  # an empty vocabulary: no word of two or more characters anywhere
        raise UserError("the lexical score found no words in the training and domain texts") from None
    sims = cosine_similarity(matrix[0], matrix[1:])[0]
    return {n: float(x) for n, x in zip(names, sims)}


def training_text(examples: list[Example]) -> str:
    """The text the lexical score reads of a training set: each prompt and its response."""
    return "\n\n".join(f"{e.prompt}\n{e.response or ''}" for e in examples)


def domain_text(examples: list[Example]) -> str:
    """The text the lexical score reads of a domain: its questions."""
    return "\n\n".join(e.prompt for e in examples)


def cosine_scores(train: FeatureStats, domains: dict[str, FeatureStats]) -> dict[str, float]:
    """The cosine baseline: the training set's mean residual against each domain's."""
    if train.count == 0:
        raise no_tokens("the training set", "no token was counted; check its data")
    for name, st in domains.items():
        if st.count == 0:
            raise no_tokens(f"domain {name}", "it is empty; check its data")
    mean = train.sum / train.count
    return {name: cosine(mean, st.sum / st.count) for name, st in domains.items()}


def effective_k(k: int, width: int, readout: Readout | None) -> int:
    """The k a score uses: on SAE features k must fit the width (else a bad --k); the raw
    baselines take min(k, hidden size), so one --k serves both readouts."""
    if readout is Readout.RAW:
        return min(k, width)
    check_k(k, width)
    return k


def domain_feature_values(name: str, singles: dict[str, FeatureStats], pairs: dict[str, PairedStats]
                          ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(domain -> the per-feature values the score reduces over S, made relative for rel-*;
    domain -> tokens they were read on)."""
    spec = spec_of(name)
    if spec.domain_demos:
        values = {d: feature_values(name, paired=st, source=d) for d, st in pairs.items()}
        tokens = {d: st.a.count for d, st in pairs.items()}
    else:
        values = {d: feature_values(name, single=st, source=d) for d, st in singles.items()}
        tokens = {d: st.count for d, st in singles.items()}
    return scored_values(name, values), tokens


def scored_values(name: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-feature domain values a score reduces over S: as read, or (rel-*) relative."""
    return relative_usage(values) if spec_of(name).relative else values


def feature_scores(name: str, shift: PairedStats, values: dict[str, torch.Tensor], k: int
                   ) -> tuple[Shift, dict[str, float], ShiftSamples | None]:
    """S from the training set's paired statistics (the relative shift for rel-*), each
    domain's values reduced over it, and what a bootstrap of the training examples needs."""
    spec = spec_of(name)
    k = effective_k(k, shift.sum_sq_diff.shape[0], spec.readout)
    # rel-*: one energy_scale both ranks the features (the relative shift) and scales the bootstrap
    scale = energy_scale(shift) if spec.relative else None
    selection = shift.sum_sq_diff if scale is None else relative_shift(shift, scale)
    result, scores = score(selection, values, k, spec.reduce)
    return result, scores, shift_samples(shift, values, result, k, spec.reduce, scale)


@dataclass
class ScoreOutput:
    """One score of every domain, and what produced it."""

    scores: dict[str, float]
    tokens: dict[str, int]  # per domain, tokens read (0 for the lexical score)
    shift: Shift | None = None  # the shifted features (features scores)
    samples: ShiftSamples | None = None  # for bootstrapping S


def score_stats(name: str, shift: PairedStats, singles: dict[str, FeatureStats],
                pairs: dict[str, PairedStats], k: int) -> ScoreOutput:
    """Any statistics-based score (features or cosine) of every domain: the one implementation
    that `sts predict` (from an extraction) and `sts score` (from files) share."""
    spec = spec_of(name)
    if spec.kind is COSINE:
        return ScoreOutput(cosine_scores(shift.a, singles), {d: st.count for d, st in singles.items()})
    if spec.kind is not FEATURES:
        raise UserError(f"the {name} score reads {', '.join(sorted(spec.kind.reads))}, not statistics files")
    values, tokens = domain_feature_values(name, singles, pairs)
    result, scores, samples = feature_scores(name, shift, values, k)
    return ScoreOutput(scores, tokens, result, samples)


# --- reference dense tensors -----------------------------------------------------------

def load_dense(path: str | Path) -> torch.Tensor:
    """A `[tokens, d_sae]` tensor as the reference saves it (memory-mapped, not read whole)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"feature file not found: {path}")
    try:
        t = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # an old-format (non-zip) file cannot be memory-mapped
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{path}: not a readable torch tensor file ({type(exc).__name__})") from None
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise UserError(f"{path}: expected a 2-D [tokens, d_sae] tensor, found {shape}")
    if t.shape[0] == 0:
        raise no_tokens(f"{path} (the tensor has no rows)", "re-extract it")
    return t


def dense_shift(base: torch.Tensor, shifted: torch.Tensor, n: int = 10_000) -> torch.Tensor:
    """shift_j = sum_{t < n} (shifted[t, j] - base[t, j])^2, rows aligned by index (over the
    rows both tensors have)."""
    if base.shape[1] != shifted.shape[1]:
        raise UserError(f"base and shifted features have different widths ({base.shape[1]} vs "
                        f"{shifted.shape[1]}); they must come from the same SAE")
    rows = min(n, base.shape[0], shifted.shape[0])
    out = torch.zeros(base.shape[1], dtype=torch.float64)
    for i in range(0, rows, _CHUNK):
        j = min(i + _CHUNK, rows)
        out += ((shifted[i:j].double() - base[i:j].double()) ** 2).sum(0)
    return out


def dense_mean_sq(domain: torch.Tensor, n: int = 10_000, power: int = 2) -> torch.Tensor:
    """mean_{t < n} D[t, j]^power per feature (power 2: the notebook's mean f^2; 1: mean f)."""
    rows = min(n, domain.shape[0])
    out = torch.zeros(domain.shape[1], dtype=torch.float64)
    for i in range(0, rows, _CHUNK):
        out += (domain[i:min(i + _CHUNK, rows)].double() ** power).sum(0)
    return out / rows


# --- statistics files ------------------------------------------------------------------

def stats_shift(stats: Stats, source: str) -> torch.Tensor:
    if not isinstance(stats, PairedStats):
        raise UserError(f"{source} holds one run's statistics, not a shift; extract it with "
                        "`sts extract --shift icl|sft|paper`")
    if stats.a.count == 0:
        raise UserError(f"{source}: no aligned tokens were extracted; check the training data")
    return stats.sum_sq_diff


# --- the whole scoring step --------------------------------------------------------------

def is_dense(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".pt", ".pth")


def domain_values(name: str, path: str | Path, max_tokens: int) -> torch.Tensor:
    """The per-feature values a score reduces over S, from a dense `.pt` tensor (act, sq) or a
    statistics file (act, sq, icl, and raw-act / raw-sq on raw-readout statistics)."""
    power = spec_of(name).dense_power
    if is_dense(path):
        if power is None:
            raise UserError(f"{path}: a dense tensor holds one run's features; the {name} score "
                            "needs statistics files (`sts extract`)")
        return dense_mean_sq(load_dense(path), max_tokens, power=power)
    if not Path(path).is_file():
        raise UserError(f"domain file not found: {path}")
    stats = load_stats(path)
    check_readout(stats, name, str(path))
    return feature_values(name, stats.a, stats if isinstance(stats, PairedStats) else None, str(path))


def check_readout(stats: Stats, name: str, source: str) -> None:
    """A raw-* score needs raw-residual statistics; an SAE score needs SAE statistics."""
    have, want = stats.meta.get("readout", "sae"), spec_of(name).readout
    if want is not None and have != want:
        raise UserError(f"{source} holds {have} statistics but the {name} score needs {want} "
                        f"statistics (`sts extract --readout {want}`)")


def score(shift: torch.Tensor, domains: dict[str, torch.Tensor], k: int, reduce: str = "mean"
          ) -> tuple[Shift, dict[str, float]]:
    """Top-k shifted features, then each domain's per-feature values reduced over them
    (`mean` for the notebook's mean f^2, `sum` for STS_act and STS_ICL)."""
    for name, values in domains.items():
        if values.shape[0] != shift.shape[0]:
            raise UserError(f"domain {name!r} has {values.shape[0]} features but the shift has "
                            f"{shift.shape[0]}; all files must come from the same SAE")
    features = top_features(shift, k)
    return Shift(shift, features), {name: domain_score(v, features, reduce) for name, v in domains.items()}


# --- the shifted-feature estimate, resampled ---------------------------------------------------

@dataclass
class ShiftSamples:
    """What it takes to recompute STS on a bootstrap resample of the training examples: each
    example's shift on the candidate features (the top C by total shift; a resample's top k
    comes from these), and each domain's mean f^2 on them. Lets `sts correlate` put the
    uncertainty of S (which features moved) into its interval, not only that of accuracy."""

    features: list[int]  # candidate feature indices, largest total shift first
    example_shift: torch.Tensor  # [examples, C] float64
    domain_values: dict[str, torch.Tensor]  # domain -> [C] float64 (what the score reduces)
    k: int
    reduce: str = "mean"  # over S: mean (sq) or sum (act, icl)
    # [C] float64: rel-* scores divide each resample's shift by the full set's energy_scale (kept
    # fixed, not resampled: the per-example energies are not stored); None: the shift as summed
    scale: torch.Tensor | None = None

    def scores(self, rows: torch.Tensor | None = None) -> dict[str, float]:
        """STS per domain from the examples `rows` (with repeats); all examples if None."""
        shift = (self.example_shift if rows is None else self.example_shift[rows]).sum(0)
        if self.scale is not None:
            shift = shift / self.scale
        top = torch.sort(shift, descending=True, stable=True).indices[: self.k]
        return {d: float(m[top].sum() if self.reduce == "sum" else m[top].mean())
                for d, m in self.domain_values.items()}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from sts.files import atomic_path

        names = list(self.domain_values)
        tensors = {"features": torch.tensor(self.features, dtype=torch.long),
                   "example_shift": self.example_shift.float().contiguous(),
                   "domain_values": torch.stack([self.domain_values[n] for n in names]).float()}
        if self.scale is not None:
            tensors["scale"] = self.scale.double().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "sts-shift-samples/2", "reduce": self.reduce,
                                                   "domains": json.dumps(names), "k": str(self.k)})

    @classmethod
    def load(cls, path: Path) -> ShiftSamples:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                t = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
            names = json.loads(meta["domains"])
            values = t["domain_values"] if "domain_values" in t else t["domain_mean_sq"]  # format 1
            return cls(t["features"].tolist(), t["example_shift"].double(),
                       {n: values[i].double() for i, n in enumerate(names)}, int(meta["k"]),
                       meta.get("reduce", "mean"), t["scale"].double() if "scale" in t else None)
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise UserError(f"{path}: not a readable shift-samples file ({exc})") from None


def shift_samples(stats: PairedStats, values: dict[str, torch.Tensor], shift: Shift, k: int,
                  reduce: str = "mean", scale: torch.Tensor | None = None) -> ShiftSamples | None:
    """Candidates: the top max(10k, 1000) features by the shift S is chosen by (capped at the
    width); `scale`: the rel-* scores' energy_scale, which divides the summed per-example shifts."""
    if stats.per_example is None:
        return None
    n = min(shift.d_sae, max(10 * k, 1000))
    candidates = top_features(shift.values, n)
    cols = torch.tensor(candidates, dtype=torch.long)
    return ShiftSamples(candidates, stats.example_shift(candidates),
                        {d: m.double()[cols] for d, m in values.items()}, k, reduce,
                        None if scale is None else scale.double()[cols])


# --- the `sts score` stage ----------------------------------------------------------------

@dataclass
class ScoreConfig:
    """One `sts score` run: shifted features from paired statistics (`shift_stats`) or from
    the reference's dense tensors (`base`, `shifted`), then a score per domain (`domains`:
    name -> .pt tensor, statistics file, or a dataset for the lexical score)."""

    out: Path
    domains: dict[str, str]
    score: str = REFERENCE_SCORE
    method: Method | None = None  # paper for dense tensors; read from the file with shift_stats
    base: Path | None = None
    shifted: Path | None = None
    shift_stats: Path | None = None
    train: str | None = None  # the training set's text, for the lexical score
    k: int = REFERENCE_K  # `sts score`'s, the reference's k
    max_tokens: int = defaults.DENSE_ROWS  # rows of each dense tensor used (the reference's N)

    def __post_init__(self) -> None:
        self.score = check_score(self.score)
        spec = spec_of(self.score)
        if self.score not in file_scores():
            raise UserError(f"--score {self.score} reads the model ({', '.join(sorted(spec.kind.reads))}), not "
                            f"statistics files: use `sts predict --score {self.score}`")
        self.method = None if self.method is None else parse(Method, self.method, "--method")
        check_positive({"--k": self.k, "--max-tokens": self.max_tokens})
        if not self.domains:
            raise UserError("give at least one --domain NAME=FILE")
        if spec.kind is LEXICAL:
            if self.train is None:
                raise UserError(f"--score {self.score} compares texts: give --train SPEC and --domain NAME=DATASET")
            if self.shift_stats is not None or self.base is not None or self.shifted is not None:
                raise UserError(f"--score {self.score} reads texts only: drop --shift-stats, --base and --shifted")
        elif self.train is not None:
            raise UserError("--train gives the lexical score its text; other scores read statistics: drop it")
        elif self.shift_stats is not None:
            if self.base is not None or self.shifted is not None:
                raise UserError("give either --shift-stats or --base/--shifted, not both")
            if not self.shift_stats.is_file():
                raise UserError(f"shift statistics file not found: {self.shift_stats}")
        else:
            if self.base is None or self.shifted is None:
                raise UserError("give --base and --shifted (.pt feature tensors), or --shift-stats")
            if self.method not in (None, Method.PAPER):
                raise UserError(f"--base/--shifted tensors are scored with --method paper (got {self.method})")
            if spec.dense_power is None:
                dense = ", ".join(n for n, s in REGISTRY.items() if s.dense_power is not None)
                raise UserError(f"dense .pt tensors give the {dense} scores; --score {self.score} needs "
                                "statistics files (`sts extract`)")
        ignored = [name for name, unused in (
            ("--k", self.k != REFERENCE_K and not spec.uses_shift),
            ("--max-tokens", self.max_tokens != defaults.DENSE_ROWS and self.base is None
             and not any(is_dense(p) for p in self.domains.values()))) if unused]
        if ignored:
            raise UserError(f"{', '.join(ignored)} would change nothing here (--k: scores over shifted features; "
                            "--max-tokens: dense .pt tensors); drop it")


@dataclass
class ScoreResult:
    """What `sts score` writes (its JSON keys)."""

    score: str
    formula: str
    method: str | None
    k: int
    shifted_features: list[int]
    scores: dict[str, float]


def run(cfg: ScoreConfig) -> ScoreResult:
    """Score every domain and write cfg.out (JSON, atomically)."""
    from dataclasses import asdict

    from sts.files import atomic_path

    spec = spec_of(cfg.score)
    features: list[int] = []
    method = cfg.method
    if spec.kind is LEXICAL:
        from sts.data import load_dataset

        assert cfg.train is not None
        scores = lexical_scores(training_text(load_dataset(cfg.train).examples),
                                {n: domain_text(load_dataset(path).examples) for n, path in cfg.domains.items()})
    elif cfg.shift_stats is not None:
        stats = load_stats(cfg.shift_stats)
        stats_shift(stats, str(cfg.shift_stats))  # paired, with aligned tokens
        assert isinstance(stats, PairedStats)
        check_readout(stats, cfg.score, str(cfg.shift_stats))
        file_method = parse(Method, stats.meta.get("shift", "icl"), "shift in the statistics file")
        if method is not None and method != file_method:
            raise UserError(f"{cfg.shift_stats} holds a '{file_method}' shift but --method {method} was asked")
        method = file_method
        if spec.kind is COSINE:
            scores = score_stats(cfg.score, stats, _single_stats(cfg.domains, cfg.score), {}, cfg.k).scores
        else:
            values = {name: domain_values(cfg.score, path, cfg.max_tokens) for name, path in cfg.domains.items()}
            result, scores, _ = feature_scores(cfg.score, stats, scored_values(cfg.score, values), cfg.k)
            features = result.features
    else:
        assert cfg.base is not None and cfg.shifted is not None
        method = Method.PAPER
        shift = dense_shift(load_dense(cfg.base), load_dense(cfg.shifted), cfg.max_tokens)
        values = {name: domain_values(cfg.score, path, cfg.max_tokens) for name, path in cfg.domains.items()}
        result, scores = score(shift, values, cfg.k, spec.reduce)
        features = result.features
    out = ScoreResult(str(cfg.score), spec.formula, None if method is None else method.value, cfg.k,
                      features, scores)
    with atomic_path(cfg.out) as tmp:
        tmp.write_text(json.dumps(asdict(out), indent=2) + "\n")
    return out


def _single_stats(domains: dict[str, str], name: str) -> dict[str, FeatureStats]:
    """Each domain's single-run statistics file, checked for the score's readout."""
    out = {}
    for domain, path in domains.items():
        if is_dense(path) or not Path(path).is_file():
            raise UserError(f"--score {name} needs a statistics file per domain (got {path})")
        stats = load_stats(path)
        check_readout(stats, name, path)
        out[domain] = stats.a
    return out
