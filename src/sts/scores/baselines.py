"""The baselines that read no SAE feature: TF-IDF cosine of the texts (`lexical`) and the cosine
of mean residuals (`cosine`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sts.engine.stats import FeatureStats
from sts.errors import UserError, no_tokens

if TYPE_CHECKING:
    from sts.data.examples import Example



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
