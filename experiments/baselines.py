"""The cheap baselines both pre-registered rounds measure beside `grad` (issue 53's candidates,
issue 54's selections): Okapi BM25 and RDS+ representation similarity. Experiment code, not a
shipped score: rank_bm25 would do BM25's job, but no shipped path needs it, so the twenty lines
here spare the package a dependency (its idf is the always-positive Lucene form,
log(1 + (N - n + 0.5) / (n + 0.5)), not rank_bm25's floored Okapi form); RDS+ has no library.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

WORD = re.compile(r"\w+")
K1, B = 1.2, 0.75  # Okapi BM25's usual constants, as the pre-registrations fix them


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed corpus of documents (its statistics: document frequencies, mean length)."""

    def __init__(self, documents: list[str]):
        self.docs = [Counter(words(d)) for d in documents]
        self.lengths = [sum(c.values()) for c in self.docs]
        self.mean = sum(self.lengths) / max(1, len(self.docs))
        df: Counter[str] = Counter()
        for c in self.docs:
            df.update(c.keys())
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def score(self, query: str, doc: int) -> float:
        c, length = self.docs[doc], self.lengths[doc]
        total = 0.0
        for w in words(query):
            f = c.get(w, 0)
            if f:
                total += self.idf[w] * f * (K1 + 1) / (f + K1 * (1 - B + B * length / self.mean))
        return total


def text_of(e: Any) -> str:
    """What a record says: its prompt and its response (or reference chain of thought)."""
    return f"{e.prompt}\n{e.response or e.cot or ''}"


def pooled(lm: Any, examples: list[Any], side: str = "train") -> Any:
    """RDS+'s representation (Ivison et al., arXiv 2503.01807): the final layer's hidden states,
    mean-pooled with weights proportional to position (1-based), unit-normalised; [n, hidden].
    It reads the tokens the gradient side reads: a training record (`side="train"`) as fine-tuning
    sees it (the chat-templated prompt and response, cut at the fitted length), a domain record
    (`side="domain"`) as `cot_nll` renders it (the chat-rendered question, then its reference
    chain of thought). A record the gradient side cannot read (no response) gets a zero row."""
    import torch

    from sts.engine.gradients import domain_items, indexed_training_items
    from sts.engine.settings import FinetuneSpec

    if side == "train":
        items = {pos: ids for pos, (ids, _start) in indexed_training_items(lm, examples, FinetuneSpec())}
    else:
        got = domain_items(lm, examples)
        if len(got) != len(examples):
            raise ValueError("every domain record needs a reference chain of thought or an answer")
        items = {i: ids for i, (ids, _start) in enumerate(got)}
    from tqdm.auto import tqdm

    model = lm.model
    rows = torch.zeros(len(examples), model.config.hidden_size)
    with torch.no_grad():
        for i, ids in tqdm(items.items(), desc=f"pooled states ({side})", unit="ex",
                           disable=len(items) < 20):
            x = torch.tensor([ids], device=model.device)
            h = model(input_ids=x, output_hidden_states=True).hidden_states[-1][0].float().cpu()
            w = torch.arange(1, h.shape[0] + 1, dtype=torch.float32)
            v = (w[:, None] * h).sum(0) / w.sum()
            rows[i] = v / v.norm()
    return rows
