"""The embedded reference domains: records known by their seals (no text ships), decontaminated by
digest, refused wherever their text would be read, and shipped statistics equal to a recomputation
on the real records (with ../shared)."""

from __future__ import annotations

import json

import pytest

from sts.data.datasets import decontaminate, load_dataset
from sts.data.examples import Example, SealedExample, record_digest, seal
from sts.errors import UserError

from .conftest import SHARED, needs_shared
from .tolerance import assert_same_reduction, forward_length


def _question(i: int, domain: str = "law") -> Example:
    return Example(f"Question {i} about {domain}?\nA. yes\nB. no", "A: Let's think. The answer is (A).", domain,
                   f"q{i}", choices=("yes", "no"), answer="A", cot="Let's think. The answer is (A).")


def test_a_sealed_record_keeps_its_identity_not_its_text():
    real = _question(1)
    sealed = seal(real, tokens=17)
    assert isinstance(sealed, SealedExample) and (sealed.uid, sealed.domain) == (real.uid, real.domain)
    assert sealed.prompt == "" and sealed.cot is None and sealed.seal.record == record_digest(real)
    assert sealed.seal.record != record_digest(_question(2)) and sealed.seal.tokens == 17
    # a training set that holds the same question removes the sealed record (by its stem's digest)
    kept, removed = decontaminate({"law": [sealed, seal(_question(2), 9)]}, [_question(1, "law")])
    assert [e.uid for e in kept["law"]] == ["q2"] and removed == {"law": 1}


def test_the_embedded_reference_domains_load_as_seals_and_refuse_their_text(model_dirs):
    from sts.engine.gradients import domain_items
    from sts.engine.models import load_model

    ds = load_dataset("embedded:mmlu-pro-cot")
    by = ds.by_domain()
    assert len(by) == 14 and len({len(q) for q in by.values()}) == 1  # the same number a category
    assert all(isinstance(e, SealedExample) for e in ds.examples)
    assert len({e.uid for e in ds.examples}) == len(ds.examples)
    lm = load_model(str(model_dirs["llama"]))
    with pytest.raises(UserError, match="ships only their statistics"):
        domain_items(lm, by["law"])


def test_a_default_prediction_that_would_read_the_sealed_text_is_refused_in_one_line(cli_fails, tmp_path,
                                                                                     monkeypatch):
    """--score lexical reads the domains' text: one line says why and what to give instead."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    cli_fails(["predict", "--score", "lexical", "--out", tmp_path / "out"], "ships only their statistics",
              "--domains", out=tmp_path / "out")


@needs_shared
def test_the_shipped_reference_sides_equal_a_recomputation_on_the_same_records():
    """The shipped sketch of one reference domain's gradient side and its SAE readout equal those
    computed now from the real records (../shared), whose digests the seals hold."""
    from sts.cache import SHIPPED, key_digest
    from sts.data.embedded import REFERENCES, default_sae_dir
    from sts.engine.gradients import DomainGradients, adapted, domain_side
    from sts.engine.models import default_model_dir
    from sts.engine.stats import load_stats
    from sts.prediction.config import PredictConfig
    from sts.prediction.extraction import _domain_stats
    from sts.prediction.session import Session, domain_key, gradient_domain_key

    manifest = json.loads(REFERENCES.read_text())
    records = {e.uid: e for name in ("mmlu_pro_cot_train.jsonl", "mmlu_pro_cot_refs.jsonl")
               for e in load_dataset(str(SHARED / "data" / name)).examples}
    sealed = load_dataset("embedded:mmlu-pro-cot").by_domain()
    tokens = {d: sum(e.seal.tokens for e in q) for d, q in sealed.items()}  # type: ignore[attr-defined]
    domain = min(tokens, key=lambda d: tokens[d])  # the cheapest domain to recompute
    real = [records[e.uid] for e in sealed[domain]]
    assert [record_digest(e) for e in real] == [e.seal.record for e in sealed[domain]]  # type: ignore[attr-defined]
    assert manifest["probe_records"] == len(real)
    cfg = PredictConfig(model=str(default_model_dir()), sae=str(default_sae_dir()), score="act")
    session = Session(cfg, lambda _m: None)
    key = gradient_domain_key(session, cfg, domain, sealed[domain], cfg.gradient_sketch)
    shipped = DomainGradients.load(SHIPPED / f"{key_digest(key)}.safetensors")
    lm = session.engine().lm
    model = adapted(lm, cfg.finetune)
    now = domain_side(lm, model, {domain: real}).sketched(cfg.gradient_sketch)
    assert now.records == shipped.records
    # shipped from another machine's run, so compared within the arithmetic's bound: one forward pass
    # of the model (30 layers of width 576, MLP 1536), its backward pass, the mean over the records'
    # tokens, and the count sketch's sum of the LoRA parameters hashed into one coordinate
    longest = max(len(lm.tokenizer(e.prompt + (e.response or "")).input_ids) for e in real) + 16  # the template's
    forward = forward_length(30, 576, 1536, longest)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = longest * len(real)
    assert_same_reduction(now.domains[domain], shipped.domains[domain],
                          length=2 * forward + tokens + lora // cfg.gradient_sketch)
    session.cache.enabled = False  # computed, not read back from what ships
    computed = _domain_stats(cfg, {domain: real}, session, ("sae",))["sae"][domain]  # what predict reads
    key = domain_key(session, cfg, sealed[domain]) | {"readout": "sae"}
    stats = load_stats(SHIPPED / f"{key_digest(key)}.safetensors")
    assert stats.a.count == computed.count
    # shipped from another machine's run: one forward pass of the model, summed over the tokens
    assert_same_reduction(computed.sum, stats.a.sum, length=forward + computed.count)
