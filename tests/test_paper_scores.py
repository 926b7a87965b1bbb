"""The paper's domain scores (STS_act, STS_ICL), the notebook's, and the baselines, each against a
direct dense computation of its formula: hidden states from a plain HF forward pass, features
from sae_lens's own `encode`, sums in numpy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sae_lens import SAE

from sts.data import Example, load_dataset
from sts.models import load_model
from sts.prediction import PredictConfig, extract_all, predict, prediction

DOMAINS = {
    "math": ["What is 2 + 3?", "Solve 2x = 8 for x.", "What is 12 times 12?", "Compute 9 - 4.",
             "Is 7 a prime number?"],
    "law": ["Courts interpret the law.", "Who settles disputes between parties?", "What is a contract?",
            "Define a tort.", "What does a judge do?"],
    "biology": ["Photosynthesis turns light into what?", "What do plants need?", "Name a cell organelle.",
                "What carries oxygen in blood?", "What is DNA made of?"],
}
M = 2  # demonstrations per domain


def _domains() -> dict[str, list[Example]]:
    return {d: [Example(q, f"The answer to '{q}' is short.", d, f"{d}{i}") for i, q in enumerate(qs)]
            for d, qs in DOMAINS.items()}


@pytest.fixture(scope="module")
def setup(model_dirs, sae_dirs, tmp_path_factory):
    import os

    os.environ["STS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    lm = load_model(str(model_dirs["llama"]))
    sae = SAE.load_from_disk(sae_dirs["topk"]).eval()
    return lm, sae, str(model_dirs["llama"]), str(sae_dirs["topk"])


def _cfg(model, sae, score, **kw) -> PredictConfig:
    return PredictConfig(model=model, sae=sae, train="train", domains="d", k=6, score=score,
                         top_contexts=0, use_cache=False, domain_demos_n=M, **kw)


def _hidden(lm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[3][0]  # after decoder layer 2 (the SAE's blocks.2.hook_resid_post)


def _features(sae, hidden: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return sae.encode(hidden).double().numpy()


def test_act_and_icl_equal_direct_dense_computation(setup, qa_file):
    lm, sae, model, sae_dir = setup
    tok = lm.tokenizer
    train = load_dataset(str(qa_file))
    act = predict(_cfg(model, sae_dir, "act"), train, _domains())
    icl = predict(_cfg(model, sae_dir, "icl"), train, _domains())  # demos: each domain's first M
    assert act.score == "act" and icl.score == "icl"
    S = [f.index for f in act.features]
    assert S == [f.index for f in icl.features] and len(S) == 6  # the same shift, the same S
    for domain, questions in DOMAINS.items():
        # STS_act: every question, each one's first token (the attention sink) left out
        rows = [_features(sae, _hidden(lm, tok(q)["input_ids"]))[1:] for q in questions]
        dense = np.concatenate(rows)
        assert act.tokens[domain] == dense.shape[0]
        assert act.scores[domain] == pytest.approx(dense[:, S].sum(1).mean(), rel=1e-5)
        # STS_ICL: the first M questions (with answers) are the demonstrations, the rest scored
        demos = _domains()[domain][:M]
        prefix = "\n\n".join(f"{d.prompt}\n{d.response}" for d in demos) + "\n\n"
        diffs = []
        for q in questions[M:]:
            ids_a = tok(q)["input_ids"]
            ids_b = tok(prefix + q)["input_ids"]
            n = len(ids_a) - 1  # the question's own tokens (BOS is not part of them)
            assert ids_b[-n:] == ids_a[1:]
            f_a = _features(sae, _hidden(lm, ids_a))[1:]
            f_b = _features(sae, _hidden(lm, ids_b))[-n:]
            diffs.append(((f_b - f_a)[:, S] ** 2).sum(1))
        per_token = np.concatenate(diffs)
        assert icl.tokens[domain] == per_token.shape[0] and icl.questions[domain] == len(questions) - M
        assert icl.scores[domain] == pytest.approx(per_token.mean(), rel=1e-4)
        assert icl.demonstrations["per_domain"][domain] == [f"{domain}0", f"{domain}1"]
    assert icl.demonstrations["source"] == "first questions"


def test_baselines_equal_direct_computation(setup, qa_file):
    lm, sae, model, sae_dir = setup
    tok = lm.tokenizer
    train = load_dataset(str(qa_file))
    cfg = _cfg(model, sae_dir, "raw-act")
    extraction = extract_all(cfg, train, _domains(), ("raw-act", "raw-sq", "cosine", "lexical"))
    got = {s: prediction(cfg, extraction, s, train) for s in ("raw-act", "raw-sq", "cosine", "lexical")}

    # The training side, directly: each example alone as a chat (its response tokens counted)
    # and with 2 demonstrations drawn as the engine draws them; residuals at the same tokens.
    from sts import extract as ex

    pairs = list(ex.icl_pairs(train.examples, tok, ex.Render(chat=True, tokens="response"), 2, 0, 512))
    shift = np.zeros(lm.hidden_size)
    base_rows = []
    for p in pairs:
        h_a = _hidden(lm, p.a.ids).double().numpy()[p.a.positions]
        h_b = _hidden(lm, p.b.ids).double().numpy()[p.b.positions]
        shift += ((h_b - h_a) ** 2).sum(0)
        base_rows.append(h_a)
        # the aligned tokens are the example's response, identical on both sides
        assert [p.a.ids[i] for i in p.a.positions] == [p.b.ids[j] for j in p.b.positions]
    top = np.argsort(-shift, kind="stable")[:6]
    assert [f.index for f in got["raw-act"].features] == top.tolist()
    train_mean = np.concatenate(base_rows).mean(0)
    for domain, questions in DOMAINS.items():
        r = np.concatenate([_hidden(lm, tok(q)["input_ids"]).double().numpy()[1:] for q in questions])
        assert got["raw-act"].scores[domain] == pytest.approx(r[:, top].sum(1).mean(), rel=1e-5)
        assert got["raw-sq"].scores[domain] == pytest.approx((r[:, top] ** 2).mean(0).mean(), rel=1e-5)
        mean = r.mean(0)
        expected = mean @ train_mean / (np.linalg.norm(mean) * np.linalg.norm(train_mean))
        assert got["cosine"].scores[domain] == pytest.approx(expected, rel=1e-5)

    # lexical: TF-IDF written out (scikit-learn's defaults: lowercase, tokens of 2+ word
    # characters, idf = ln((1 + n) / (1 + df)) + 1, rows l2-normalised), then cosine.
    train_text = "\n\n".join(f"{e.prompt}\n{e.response}" for e in train.examples)
    texts = [train_text] + ["\n\n".join(e.prompt for e in _domains()[d]) for d in DOMAINS]
    words = [re.findall(r"(?u)\b\w\w+\b", t.lower()) for t in texts]
    vocab = sorted({w for ws in words for w in ws})
    tf = np.array([[ws.count(v) for v in vocab] for ws in words], float)
    idf = np.log((1 + len(texts)) / (1 + (tf > 0).sum(0))) + 1
    tfidf = tf * idf
    tfidf /= np.linalg.norm(tfidf, axis=1, keepdims=True)
    for i, domain in enumerate(DOMAINS, start=1):
        assert got["lexical"].scores[domain] == pytest.approx(float(tfidf[0] @ tfidf[i]), rel=1e-9)
    assert max(got["lexical"].scores, key=got["lexical"].scores.get) == "math"  # the training set is arithmetic


def test_domain_demonstrations_from_a_file_use_the_chain_of_thought(tmp_path):
    from sts.data import domain_demonstrations
    from sts.errors import UserError

    from .conftest import write_jsonl

    records = [{"question_id": i, "question": q, "options": ["yes", "no"], "answer": "A", "answer_index": 0,
                "category": d, "src": "t", "cot_content": f"A: Let's think step by step. {d} {i}. The answer is (A)."}
               for d, qs in DOMAINS.items() for i, q in enumerate(qs[:3])]
    spec = str(write_jsonl(tmp_path / "demos.jsonl", records))
    groups = {d: [Example(f"{q}\nA. yes\nB. no", None, d, f"{d}{i}") for i, q in enumerate(qs)]
              for d, qs in DOMAINS.items()}
    demos, left = domain_demonstrations(groups, 2, spec)
    for d in DOMAINS:
        assert [e.response for e in demos.demos[d]] == [
            f"Let's think step by step. {d} {i}. The answer is (A)." for i in range(2)]
        # a demonstration is never also a scored question; the rest stay, in order
        assert [e.uid for e in left[d]] == [f"{d}{i}" for i in range(2, 5)]
    with pytest.raises(UserError, match="fewer than 4 demonstrations"):
        domain_demonstrations(groups, 4, spec)
    with pytest.raises(UserError, match="no questions left"):
        domain_demonstrations(groups, 5)


def test_paper_protocol_picks_the_4_largest_and_4_smallest_absolute_changes():
    from sts import correlation as co

    wanted = {"a": -12, "b": 9, "c": -7, "d": 6, "k": 5, "j": -4, "e": 3, "f": -2, "g": 1, "h": 0}
    changes = {}
    for d, delta in wanted.items():  # 100 paired questions: |delta| of them flip one way
        base, tuned = np.zeros(100), np.zeros(100)
        (base if delta < 0 else tuned)[: abs(delta)] = 1
        changes[d] = co.DomainChange(base, tuned)
    deltas = {d: c.delta for d, c in changes.items()}
    assert deltas == pytest.approx({d: float(v) for d, v in wanted.items()})
    sts = {d: float(i) for i, d in enumerate(sorted(deltas))}
    corr = co.correlate(sts, changes, replicates=50, protocol="paper")
    by_size = sorted(deltas, key=lambda d: abs(deltas[d]))
    assert corr.domains_used == sorted(by_size[:4] + by_size[-4:]) == sorted("abcdefgh")
    x = [sts[d] for d in corr.domains_used]
    y = [abs(deltas[d]) for d in corr.domains_used]
    assert corr.pearson == pytest.approx(np.corrcoef(x, y)[0, 1]) and corr.domains == 8
    assert "outcome" in corr.protocol_note
    signed = co.correlate(sts, changes, replicates=50, protocol="signed")
    assert signed.domains_used == sorted(deltas)
    assert signed.pearson == pytest.approx(np.corrcoef([sts[d] for d in sorted(deltas)],
                                                       [deltas[d] for d in sorted(deltas)])[0, 1])
    absolute = co.correlate(sts, changes, replicates=50, protocol="abs")
    assert absolute.pearson == pytest.approx(np.corrcoef([sts[d] for d in sorted(deltas)],
                                                         [abs(deltas[d]) for d in sorted(deltas)])[0, 1])
    assert absolute.pearson != pytest.approx(signed.pearson)
