"""A library of measured fine-tuning runs on one model and SAE, and what it lets a prediction
say: which part of a domain's predicted gain any training of this kind brings (shared), and
which part is this training set's own.

Transfer matrices are close to low-rank: a domain main effect (how much any training moves a
domain), a set main effect, and a small interaction that is the set's own part (arXiv
2406.14026). The transfer experiment found the default score predicting mostly the first
(docs/results/transfer). With a library of runs whose changes were measured (`sts validate`
writes one, `library.json`), a prediction splits, per domain and in standard units (z-scores
across the domains both share):

    shared_D = mean over library sets of z(measured change)_D   (what training of this kind does)
    own_D    = z(score of this set)_D - mean over library sets of z(their score)_D
    combined = shared + own

`shared` uses measured outcomes of other sets only (a set of the same spec is left out), so it
never sees the set's own outcome; `own` is the set's score beyond the library's typical score
profile (the double-centred part that specificity and the swap test judge). The library must
come from the same SAE (its config and weights) and hold the same score at the same k.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sts.errors import UserError

if TYPE_CHECKING:
    from sts.data.examples import Example

FORMAT = "sts-library/1"


@dataclass
class LibrarySet:
    spec: str
    scores: dict[str, dict[str, float]]  # score name -> domain -> value (icl shift)
    changes: dict[str, dict[str, float]]  # metric -> domain -> measured change (gain units)


@dataclass
class Library:
    sae: str  # identity of the SAE: `sae_identity` (its config and weights, or its spec where not local)
    model: str  # the model as the runs named it
    k: int
    metric: str  # the metric `shared` is measured in
    sets: dict[str, LibrarySet] = field(default_factory=dict)
    source: str = ""
    # score -> what its domain side read (`side_label`): a prediction whose own side differs gets
    # no shared/own split and no calibration from this library (scores of two kinds do not mix);
    # a library written before sides were recorded says nothing, and serves no prediction
    sides: dict[str, str] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        from sts.files import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Library:
        p = Path(path)
        if p.is_dir():
            p = p / "library.json"
        try:
            raw = json.loads(p.read_text())
            if raw.pop("format", None) != FORMAT:
                raise ValueError("format")
            sets = {n: LibrarySet(**s) for n, s in raw.pop("sets").items()}
            raw.pop("source", None)  # where it is read from now
            return cls(**raw, sets=sets, source=str(path))
        except (OSError, ValueError, TypeError, KeyError):
            raise UserError(f"{path}: not an sts library (a library.json that `sts validate` writes, or its "
                            "folder)") from None


def sae_identity(sae: str) -> str:
    """A local SAE's sha256 of its config and weights (`cfg.json`, `sae_weights.safetensors`:
    the same weights under another architecture are another SAE), else the spec itself."""
    import hashlib

    from sts.data.embedded import file_sha256

    parts = [Path(sae) / "cfg.json", Path(sae) / "sae_weights.safetensors"]
    if not all(p.is_file() for p in parts):
        return sae
    return hashlib.sha256("".join(file_sha256(p) for p in parts).encode()).hexdigest()


@dataclass
class Decomposition:
    """Per domain, in standard units: shared (the library's typical measured gain profile), own
    (this set's score beyond the library's typical score profile), combined (their sum)."""

    shared: dict[str, float]
    own: dict[str, float]
    combined: dict[str, float]
    metric: str
    library_sets: list[str]
    library: str


def zscores(values: dict[str, float], domains: list[str]) -> dict[str, float]:
    """`values` on `domains`, standardised across them (all zero where they do not vary)."""
    import numpy as np

    x = np.array([values[d] for d in domains], dtype=float)
    sd = x.std()
    return {d: float(v) for d, v in zip(domains, (x - x.mean()) / sd if sd > 0 else x * 0)}


def decompose(library: Library, score: str, scores: dict[str, float],
              leave_out: str | Sequence[str] | None = None) -> Decomposition:
    """Split one set's `scores` by the library (sets named in `leave_out` are left out: a
    mixture leaves out each of its parts)."""
    import numpy as np

    members = {n: s for n, s in library.sets.items() if not left_out(s.spec, leave_out) and score in s.scores
               and library.metric in s.changes}
    if len(members) < 2:
        raise UserError(f"the library {library.source} holds fewer than 2 other sets with the {score} score and "
                        f"{library.metric} changes; give a larger --library")
    domains = sorted(set(scores).intersection(*(set(s.scores[score]) & set(s.changes[library.metric])
                                                for s in members.values())))
    if len(domains) < 3:
        raise UserError(f"the library {library.source} shares fewer than 3 domains with this prediction")
    shared = {d: float(np.mean([zscores(s.changes[library.metric], domains)[d] for s in members.values()]))
              for d in domains}
    typical = {d: float(np.mean([zscores(s.scores[score], domains)[d] for s in members.values()])) for d in domains}
    mine = zscores(scores, domains)
    own = {d: mine[d] - typical[d] for d in domains}
    return Decomposition(shared, own, {d: shared[d] + own[d] for d in domains}, library.metric, sorted(members),
                         library.source)


def set_name(spec: str) -> str:
    """A training set as a library names it: its file's name and selector, not the folder it
    sat in on the machine that measured it (`/home/me/data/x.jsonl#category=y` ->
    `x.jsonl#category=y`)."""
    base, sep, selector = spec.partition("#")
    name = base if base.startswith("embedded:") else Path(base).name
    return name + sep + selector


def left_out(spec: str, leave_out: str | Sequence[str] | None) -> bool:
    """Whether a library set is one of `leave_out` (by `set_name`)."""
    names = [leave_out] if isinstance(leave_out, str) else list(leave_out or [])
    return any(set_name(spec) == set_name(n) for n in names)


EMBEDDED_MODEL = "embedded SmolLM2-135M-Instruct"


def model_label(spec: str) -> str:
    """A model as libraries name it: the embedded one by that name (wherever its checkpoint
    was built), any other by its last path component (a hub id and its local copy agree)."""
    from sts.cache import DEFAULT_MODEL_DIRNAME, cache_root

    if not spec or spec == EMBEDDED_MODEL or Path(spec).resolve() == (cache_root() / DEFAULT_MODEL_DIRNAME).resolve():
        return EMBEDDED_MODEL
    return Path(spec.rstrip("/")).name


def check_library(library: Library, sae: str, score: str, k: int, model: str | None = None) -> str | None:
    """Why this library cannot decompose or calibrate this prediction, or None if it can
    (`model`: checked where given)."""
    if library.sae != sae_identity(sae):
        return f"the library {library.source} comes from another SAE"
    if model is not None and library.model and model_label(library.model) != model_label(model):
        return f"the library {library.source} was measured on {library.model}, not {model_label(model)}"
    if library.k != k:
        return f"the library {library.source} holds k = {library.k}, this prediction k = {k}"
    if not any(score in s.scores for s in library.sets.values()):
        return f"the library {library.source} holds no {score} scores"
    return None


def side_label(gradient: bool, spec: str, records: Iterable[Example]) -> str:
    """What a score's domain side reads, as a library records it and a prediction compares it: the
    domain set (`set_name` of its spec) and the kind of record. A gradient score reads each record's
    reference chain of thought where it has one (a sealed embedded record is one), else the correct
    option's text; every other score reads the questions."""
    from sts.data.examples import has_reference

    if not gradient:
        return f"{set_name(spec)}: questions"
    refs = [has_reference(e) for e in records]
    kind = "reference chains of thought" if all(refs) else "answer texts" if not any(refs) else \
        "reference chains of thought and answer texts"
    return f"{set_name(spec)}: {kind}"


def side_mismatch(library: Library, score: str, side: str) -> str | None:
    """Why this library's `score` was read on another kind of domain side than `side`, or None."""
    theirs = library.sides.get(score)
    if theirs == side:
        return None
    return (f"the library {library.source} does not say what its {score} scores read" if theirs is None else
            f"the library's {score} scores read {theirs}, this prediction {side}") + \
        ": scores of two kinds do not share a scale"


def from_validation(out: Path, per_train: dict[str, dict[str, Any]], changes: dict[str, dict[str, Any]],
                    sae: str, model: str, k: int, metric: str, sides: dict[str, str]) -> Library:
    """The library a `sts validate` run makes of its own sets (icl-shift scores, every metric;
    `sides`: what each score's domain side read)."""
    sets = {t: LibrarySet(info["spec"], info["scores"]["icl"],
                          {m: {d: c.delta for d, c in by_domain.items()} for m, by_domain in changes[t].items()})
            for t, info in per_train.items()}
    return Library(sae_identity(sae), model_label(model), k, metric, sets, str(out), sides)
