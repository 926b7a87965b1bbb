"""Scoring: the registry of scores and the formulas over shifted features (formulas in shared/DESIGN.md).

    shift_j = sum_t (shifted[t, j] - base[t, j])^2
    S       = the k features with the largest shift, largest first

and, per domain D, one of the registered scores (`REGISTRY`, one `ScoreSpec` each: its
formula, its `Kind` (what it reads of an `Extraction` and how it scores it), readout, per-feature
domain value, reduction over S, and whether it is relative): the paper's STS_act and STS_ICL, the
reference notebook's mean f^2, scale-free versions of STS_act and STS_ICL, and baselines that need
no SAE (raw residual dimensions instead of features, residual cosine, TF-IDF cosine, the LoRA
gradients). Every score over S is a reduction over S of one per-feature number of D's statistics,
so one extraction serves them all. `score_stats` computes any of them from statistics; `sts score`
(`sts.scores.files`) and `sts predict` (an extraction) both call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sts.choices import Readout, Score
from sts.errors import UserError, no_tokens
from sts.scores.features import (
    domain_score,
    effective_k,
    energy_scale,
    icl_change,
    mean_activation,
    mean_square,
    relative_shift,
    relative_usage,
)

if TYPE_CHECKING:  # the registry and its lists load without torch: `sts --help` and `sts scores` stay light
    import torch

    from sts.data.datasets import DomainDemos
    from sts.engine.gradients import GradientStats
    from sts.engine.stats import FeatureStats, PairedStats
    from sts.scores.selection import Shift, ShiftSamples

# --- what a score is -------------------------------------------------------------------------

# [width] from a domain's statistics: its single run (FeatureStats), or for a domain_demos
# score its run with and without its demonstrations (PairedStats)
DomainValue = Callable[[Any], "torch.Tensor"]


@dataclass
class Extraction:
    """Everything the scores read, extracted once (`sts.prediction.extraction.extract_all`): the training
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
    gradients: GradientStats | None = None  # the gradient scores' (sts.engine.gradients)
    lookahead: dict[str, dict[str, float]] = field(default_factory=dict)  # score -> domain -> loss drop (line, look...)


# What a kind of score can read of an Extraction; `sts.prediction.extraction.extract_all` extracts the union
# of what the asked scores read, and nothing else.
READS = ("statistics", "texts", "gradients", "lookahead")


@dataclass(frozen=True)
class Kind:
    """A family of scores: what they read and how one of them scores an Extraction. `compute`
    gets the score's spec, the extraction and k (the number of shifted features), and returns a
    `ScoreOutput`. `reads` (a subset of READS): statistics (the training shift and the domains'
    statistics of the score's `readout`), texts, gradients (the LoRA gradient sides of
    `sts.engine.gradients`), lookahead (the run's first steps, `sts.engine.lookahead`). `counts`: what
    `ScoreOutput.tokens` counts per domain (the report's column). `mixes`: a mixture of training
    sets' extractions gives the score (`sts.prediction.compare`); a text or a run of one set has no mixture."""

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


def _statistics(spec: ScoreSpec, x: Extraction, k: int) -> ScoreOutput:
    """FEATURES and COSINE: `score_stats` on the statistics of the score's readout (the one
    implementation `sts score` shares)."""
    readout = spec.readout or Readout.SAE
    return score_stats(spec.name, x.shift[readout], x.domains.get(readout, {}), x.domain_icl, k)


def _lexical(spec: ScoreSpec, x: Extraction, k: int) -> ScoreOutput:
    from sts.scores.baselines import lexical_scores

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
    return ScoreOutput(dict(x.lookahead[spec.name]), {d: x.questions.get(d, 0) for d in x.lookahead[spec.name]})


FEATURES = Kind("features", _statistics, frozenset({"statistics"}))  # a per-feature domain value reduced over S
COSINE = Kind("cosine", _statistics, frozenset({"statistics"}))  # residual means, training set vs domain
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
    `gradient` scores need no SAE: they read the LoRA gradients of `sts.engine.gradients`."""

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
    # moving update); lookahead scores (`sts.engine.lookahead`): line, look or look-fo
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
              "ground-truth loss, both on the LoRA adapter at its first step (sts.engine.gradients)", None,
              kind=GRADIENT,
              baseline=True, uses_shift=False,
              label="first-order loss drop of one SGD step, <G, g_D>",
              validated="on the reference chain-of-thought loss (cot_nll) of 10 measured sets, with each domain "
              "read on 10 reference chains of thought that no evaluation measured and the training side on the "
              "set's first 25 examples (as shipped; docs/results/probes, docs/results/subset): which domains this "
              "set moves more than other training would (specificity +0.87; +0.96 on the 3 held-out sets) and the "
              "gains' profile (median per-set Pearson +0.58; +0.58). That is format: where a set teaches content "
              "(math problems, instructions) the profile was at chance (median -0.16 over 6 sets; "
              "docs/results/ceiling)",
              validated_answers="on answer texts (domains without reference chains of thought) it predicted little, "
              "post hoc over 10 measured sets (specificity +0.11, median per-set Pearson +0.15; "
              "docs/results/heldout/SHIPPED.md): give domains with reference chains of thought"),
    ScoreSpec(Score.GRAD_ADAM, "<G / sqrt(v), g_D>: as grad, the training gradient divided per coordinate by the "
              "root of its mean square over the training examples (Adam's first update)", None, kind=GRADIENT,
              baseline=True, uses_shift=False, direction="adam",
              label="first-order loss drop of Adam's first step, <G/√v, g_D>",
              validated="with each domain read on 10 reference chains of thought that no evaluation measured and "
              "the training side on the set's first 25 examples (as shipped; docs/results/probes, "
              "docs/results/subset), over 10 measured sets: which domains this set moves more than other training "
              "would (specificity +0.92; +0.97 on the 3 held-out sets) and the gains' profile (median per-set "
              "Pearson +0.51; +0.52)",
              validated_answers="on answer texts (domains without reference chains of thought) it predicted little, "
              "post hoc over 10 measured sets (specificity +0.13, median per-set Pearson +0.11; "
              "docs/results/heldout/SHIPPED.md)"),
)
_RUN = " (the LoRA run of sts finetune's recipe, sts.engine.lookahead)"
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
    if spec.reads("statistics") and spec.readout is None:
        raise ValueError(f"score {spec.name!r} reads statistics: give the readout they are read on (Readout.SAE "
                         "or Readout.RAW)")
    if spec.uses_shift and spec.kind.reads != {"statistics"}:
        raise ValueError(f"score {spec.name!r} reads no statistics, so it cannot depend on the shifted features: "
                         "set uses_shift=False")
    if not spec.name or spec.name.startswith("-") or any(c.isspace() or c == "," for c in spec.name):
        raise ValueError(f"score name {spec.name!r}: use a short word without spaces or commas (e.g. my-score)")
    if spec.kind is FEATURES and spec.value is None:
        raise ValueError(f"score {spec.name!r}: a features score needs its per-feature domain value")
    REGISTRY[spec.name] = spec
    return spec


for _spec in BUILTIN:
    register(_spec)


def load_plugins() -> list[str]:
    """Import the modules of the `sts.scores` entry-point group (a package's
    `[project.entry-points."sts.scores"]`), whose imports `register` their scores; the names of
    the scores they added. A plugin that fails to import is bad input, said in one line."""
    from importlib.metadata import entry_points

    _PLUGINS_READ[:] = [True]  # a lookup after this call reads nothing again
    before = set(REGISTRY)
    for point in entry_points(group="sts.scores"):
        try:
            point.load()
        except Exception as exc:  # any error of a third-party module: said in one line, not a traceback
            raise UserError(f"the score plugin {point.name} ({point.value}) failed to load: "
                            f"{type(exc).__name__}: {exc}; fix or uninstall it") from None
    return [n for n in REGISTRY if n not in before]


_PLUGINS_READ: list[bool] = []  # the first lookup imports the plugins (`load_plugins`), once


def _plugins() -> None:
    if not _PLUGINS_READ:
        load_plugins()


def names(where: Callable[[ScoreSpec], bool] = lambda _s: True) -> tuple[str, ...]:
    """The registered scores for which `where` holds, in the order they were registered (the
    built-in ones first, in the order reports list them; the plugins' after them)."""
    _plugins()
    return tuple(n for n, s in REGISTRY.items() if where(s))


def statistics_scores() -> tuple[str, ...]:
    """What one extraction of SAE / residual statistics and texts gives (no backward pass)."""
    return names(lambda s: not s.run_based)


def gradient_scores() -> tuple[str, ...]:
    """What the gradient sides give (no lookahead run)."""
    return names(lambda s: s.reads("gradients") and not s.reads("lookahead"))


def validated_scores() -> tuple[str, ...]:
    """What `sts validate` runs: one extraction's scores and the gradient sides'. A lookahead score
    runs the fine-tuning recipe's first steps for every set: `experiments/beyond` measures those."""
    return statistics_scores() + gradient_scores()


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


def spec_of(name: str) -> ScoreSpec:
    """The registered score `name`, or a UserError listing the registered ones."""
    _plugins()
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
    from sts.scores.selection import shift_samples

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
    from sts.scores.baselines import cosine_scores

    spec = spec_of(name)
    if spec.kind is COSINE:
        return ScoreOutput(cosine_scores(shift.a, singles), {d: st.count for d, st in singles.items()})
    if spec.kind is not FEATURES:
        raise UserError(f"the {name} score reads {', '.join(sorted(spec.kind.reads))}, not statistics files")
    values, tokens = domain_feature_values(name, singles, pairs)
    result, scores, samples = feature_scores(name, shift, values, k)
    return ScoreOutput(scores, tokens, result, samples)


def score(shift: torch.Tensor, domains: dict[str, torch.Tensor], k: int, reduce: str = "mean"
          ) -> tuple[Shift, dict[str, float]]:
    """Top-k shifted features, then each domain's per-feature values reduced over them
    (`mean` for the notebook's mean f^2, `sum` for STS_act and STS_ICL)."""
    from sts.scores.selection import Shift, top_features

    for name, values in domains.items():
        if values.shape[0] != shift.shape[0]:
            raise UserError(f"domain {name!r} has {values.shape[0]} features but the shift has "
                            f"{shift.shape[0]}; all files must come from the same SAE")
    features = top_features(shift, k)
    return Shift(shift, features), {name: domain_score(v, features, reduce) for name, v in domains.items()}
