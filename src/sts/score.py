"""Scoring: shifted features S and a score per domain (formulas in shared/DESIGN.md).

    shift_j = sum_t (shifted[t, j] - base[t, j])^2
    S       = the k features with the largest shift, largest first

and, per domain D, one of `SCORES` (their formulas in `FORMULAS`): the paper's STS_act and
STS_ICL, the reference notebook's mean f^2, scale-free versions of STS_act and STS_ICL (`RELATIVE`),
and baselines that need no SAE (raw residual
dimensions instead of features, residual cosine, TF-IDF cosine). Every score over S is a
reduction over S of one per-feature number of D's statistics, so one extraction serves them
all. The same formulas serve the reference's dense `.pt` tensors (method `paper`, rows
aligned by index, first N rows) and our streamed statistics files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sts.choices import REFERENCE_K, REFERENCE_SCORE, Method, Score, parse
from sts.errors import UserError, check_positive, no_tokens
from sts.stats import FeatureStats, PairedStats, Stats, load_stats

SCORES = tuple(Score)
BASELINES = (Score.RAW_ACT, Score.RAW_SQ, Score.COSINE, Score.LEXICAL)
FORMULAS: dict[str, str] = {
    "act": "STS_act(D) = mean over D's counted tokens t of sum_{j in S} f_j(x_t)",
    "icl": "STS_ICL(D) = mean over D's counted question tokens of sum_{j in S} "
           "(f_j(demos_D, x) - f_j(x))^2",
    "sq": "STS_sq(D) = mean_{j in S} mean_t f_j(x_t)^2 (the reference notebook's score)",
    "rel-act": "sum_{j in S_rel} u_Dj, u_Dj = mean_t f_j on D / its mean over the scored domains; "
               "S_rel = the k features with the largest sum_t (f_b - f_a)^2 / (sum_t (f_a^2 + f_b^2) + eps)",
    "rel-icl": "sum_{j in S_rel} u_Dj, u_Dj = mean (f_j(demos_D, x) - f_j(x))^2 on D / its mean over the "
               "scored domains; S_rel as for rel-act",
    "raw-act": "mean over D's counted tokens t of sum_{j in S_raw} r_j(x_t), S_raw = the k residual "
               "dimensions with the largest shift (r: the hooked layer's residual stream)",
    "raw-sq": "mean_{j in S_raw} mean_t r_j(x_t)^2, S_raw = the k residual dimensions with the "
              "largest shift",
    "cosine": "cos(mean r over the training set's counted tokens, mean r over D's counted tokens)",
    "lexical": "cosine of the TF-IDF vectors (scikit-learn TfidfVectorizer fitted on the training "
               "text and every domain's text) of the training text and D's text",
}
# Which readout each score needs: SAE features, raw residual dimensions, or text only.
READOUT: dict[str, str | None] = {"act": "sae", "icl": "sae", "sq": "sae", "rel-act": "sae", "rel-icl": "sae",
                                  "raw-act": "raw",
                                  "raw-sq": "raw", "cosine": "raw", "lexical": None}
# How a score over S reduces the per-feature values: a sum over S, or a mean.
REDUCE: dict[str, str] = {"act": "sum", "icl": "sum", "sq": "mean", "rel-act": "sum", "rel-icl": "sum",
                          "raw-act": "sum", "raw-sq": "mean"}
# The scale-free scores and the per-feature value each makes relative. Why they exist: the total
# squared shift grows with a feature's own scale, so it picks features that fire strongly on any
# text, and a domain's raw usage mixes how much it uses a feature with how large that feature's
# activations are; on the transfer experiment's first sets both made the scores nearly the same
# for every training set (docs/results/transfer/ADDENDUM.md, where they are defined).
RELATIVE: dict[str, str] = {"rel-act": "act", "rel-icl": "icl"}
EPS_SHARE = 1e-3  # eps of the relative shift, as a share of the mean per-feature base energy


def base_value(name: str) -> str:
    """The per-feature domain value a score reduces: its own, or the one a rel-* score makes relative."""
    return RELATIVE.get(name, name)


def uses_domain_demos(name: str) -> bool:
    """Whether the score reads each domain with and without its demonstrations (icl, rel-icl)."""
    return base_value(name) == "icl"


def check_score(name: str) -> Score:
    return parse(Score, name, "score")


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
    """The per-feature number of a domain that the score `name` reduces over S:
    act / raw-act: mean f over counted tokens; sq / raw-sq: mean f^2; icl: mean (f_demos - f)^2
    over aligned question tokens (from paired statistics); rel-act / rel-icl: act's / icl's
    (made relative across domains by `relative_usage`, which needs every domain at once)."""
    name = base_value(name)
    if name == "icl":
        if paired is None:
            raise UserError(f"{source}: the icl score needs the domain's paired statistics (each "
                            "question with and without its domain's demonstrations: `sts extract "
                            "--shift icl --domain-demos SPEC`)")
        if paired.a.count == 0:
            raise no_tokens(f"domain {source}", "no question token stayed aligned with its demonstrations; "
                            "give shorter demonstrations or raise --max-length")
        return paired.sum_sq_diff / paired.a.count
    if single is None or single.count == 0:
        raise no_tokens(f"domain {source}", "it is empty; check its data")
    return single.sum / single.count if name in ("act", "raw-act") else single.sum_sq / single.count


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


def selection_shift(name: str, stats: PairedStats) -> torch.Tensor:
    """What S is the top k of: the total squared shift, or (rel-*) the relative shift."""
    return relative_shift(stats) if name in RELATIVE else stats.sum_sq_diff


def scored_values(name: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-feature domain values a score reduces over S: as read, or (rel-*) relative."""
    return relative_usage(values) if name in RELATIVE else values


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
    if is_dense(path):
        if name not in ("act", "sq"):
            raise UserError(f"{path}: a dense tensor holds one run's features; the {name} score "
                            "needs statistics files (`sts extract`)")
        return dense_mean_sq(load_dense(path), max_tokens, power=1 if name == "act" else 2)
    if not Path(path).is_file():
        raise UserError(f"domain file not found: {path}")
    stats = load_stats(path)
    check_readout(stats, name, str(path))
    return feature_values(name, stats.a, stats if isinstance(stats, PairedStats) else None, str(path))


def check_readout(stats: Stats, name: str, source: str) -> None:
    """A raw-* score needs raw-residual statistics; an SAE score needs SAE statistics."""
    have, want = stats.meta.get("readout", "sae"), READOUT.get(name)
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
    score: Score = REFERENCE_SCORE
    method: Method | None = None  # paper for dense tensors; read from the file with shift_stats
    base: Path | None = None
    shifted: Path | None = None
    shift_stats: Path | None = None
    train: str | None = None  # the training set's text, for the lexical score
    k: int = REFERENCE_K  # `sts score`'s, the reference's k
    max_tokens: int = 10_000  # rows of each dense tensor used (the reference's N)

    def __post_init__(self) -> None:
        self.score = parse(Score, self.score, "--score")
        self.method = None if self.method is None else parse(Method, self.method, "--method")
        check_positive({"--k": self.k, "--max-tokens": self.max_tokens})
        if not self.domains:
            raise UserError("give at least one --domain NAME=FILE")
        if self.score is Score.LEXICAL:
            if self.train is None:
                raise UserError("--score lexical compares texts: give --train SPEC and --domain NAME=DATASET")
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
            if self.score not in (Score.ACT, Score.SQ):
                raise UserError(f"dense .pt tensors give the act and sq scores; --score {self.score} needs "
                                "statistics files (`sts extract`)")


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

    features: list[int] = []
    method = cfg.method
    if cfg.score is Score.LEXICAL:
        from sts.data import load_dataset

        assert cfg.train is not None
        train_text = "\n\n".join(f"{e.prompt}\n{e.response or ''}" for e in load_dataset(cfg.train).examples)
        texts = {n: "\n\n".join(e.prompt for e in load_dataset(spec).examples) for n, spec in cfg.domains.items()}
        scores = lexical_scores(train_text, texts)
    elif cfg.shift_stats is not None:
        stats = load_stats(cfg.shift_stats)
        shift = stats_shift(stats, str(cfg.shift_stats))
        check_readout(stats, cfg.score, str(cfg.shift_stats))
        file_method = parse(Method, stats.meta.get("shift", "icl"), "shift in the statistics file")
        if method is not None and method != file_method:
            raise UserError(f"{cfg.shift_stats} holds a '{file_method}' shift but --method {method} was asked")
        method = file_method
        if cfg.score is Score.COSINE:
            domain_stats = {}
            for name, path in cfg.domains.items():
                if is_dense(path) or not Path(path).is_file():
                    raise UserError(f"--score cosine needs raw statistics files per domain (got {path})")
                domain_stats[name] = load_stats(path)
                check_readout(domain_stats[name], cfg.score, path)
            train_mean = stats.a.sum / stats.a.count
            scores = {n: cosine(train_mean, st.a.sum / max(st.a.count, 1)) for n, st in domain_stats.items()}
        else:
            values = {name: domain_values(cfg.score, path, cfg.max_tokens) for name, path in cfg.domains.items()}
            if cfg.score in RELATIVE:
                assert isinstance(stats, PairedStats)  # stats_shift checked it
                shift = selection_shift(cfg.score, stats)
            result, scores = score(shift, scored_values(cfg.score, values), min(cfg.k, shift.shape[0]),
                                   REDUCE[cfg.score])
            features = result.features
    else:
        assert cfg.base is not None and cfg.shifted is not None
        method = Method.PAPER
        shift = dense_shift(load_dense(cfg.base), load_dense(cfg.shifted), cfg.max_tokens)
        values = {name: domain_values(cfg.score, path, cfg.max_tokens) for name, path in cfg.domains.items()}
        result, scores = score(shift, values, cfg.k, REDUCE[cfg.score])
        features = result.features
    out = ScoreResult(cfg.score.value, FORMULAS[cfg.score], None if method is None else method.value, cfg.k,
                      features, scores)
    with atomic_path(cfg.out) as tmp:
        tmp.write_text(json.dumps(asdict(out), indent=2) + "\n")
    return out
