"""Issue 54: each training example's share of `grad`. G = sum_i (t_i / T) g_i, so the score is the
sum of the examples' terms (t_i / T) <g_i, g_D>, sketched or exact; the terms are checked against a
loop of one autograd gradient per example, and their sum against the printed score."""

from __future__ import annotations

import pytest
import torch

from sts.data.datasets import load_dataset
from sts.engine.gradients import (
    GradientStats,
    PerExample,
    TrainingGradients,
    adapted,
    domain_side,
    indexed_training_items,
    sketch,
    training_side,
)
from sts.engine.models import load_model
from sts.engine.settings import FinetuneSpec
from tests.test_gradients import _grad, _hf_loss
from tests.tolerance import TINY_FORWARD, assert_same_reduction

DIM = 512


@pytest.fixture
def pieces(model_dirs, qa_file, domain_file):
    lm = load_model(str(model_dirs["llama"]))
    train = load_dataset(str(qa_file)).examples
    domains = load_dataset(str(domain_file)).by_domain()
    spec = FinetuneSpec(lora_r=4, seed=5)
    model = adapted(lm, spec)
    return lm, model, train, domains, spec


def _by_hand(lm, model, train, spec) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Each kept example's position, its autograd gradient and its response tokens."""
    indexed = indexed_training_items(lm, train, spec)
    grads = torch.stack([_grad(model, _hf_loss(model, ids, start)).double() for _, (ids, start) in indexed])
    tokens = torch.tensor([float(len(ids) - start) for _, (ids, start) in indexed], dtype=torch.float64)
    return [pos for pos, _ in indexed], grads, tokens


def test_sketched_contributions_are_each_examples_term_and_sum_to_the_score(pieces):
    lm, model, train, domains, spec = pieces
    keep = PerExample(dim=DIM)
    side = training_side(lm, model, train, spec, keep=keep)
    doms = domain_side(lm, model, domains).sketched(DIM)
    stats = GradientStats.join(side.sketched(DIM), doms)
    parts = stats.contributions()
    assert parts is not None and set(parts) == set(domains)
    positions, grads, tokens = _by_hand(lm, model, train, spec)
    assert stats.example_index == positions
    share = tokens / tokens.sum()
    scores = stats.scores()
    for d, g in doms.domains.items():
        want = share * (torch.stack([sketch(gi, DIM) for gi in grads]) @ g.double())
        assert_same_reduction(parts[d], want, length=2 * TINY_FORWARD + int(tokens.sum()),
                              scale=float(want.abs().max()))
        assert scores[d] == float(parts[d].sum())  # the printed score is the terms' sum, not near it
        # and the sum is the sketched score of the mean gradient, as the validated form reads it
        g_mean = share @ grads
        assert_same_reduction(torch.tensor(scores[d]), sketch(g_mean, DIM) @ g.double(),
                              length=2 * TINY_FORWARD + int(tokens.sum()), scale=float(want.abs().sum()))
    assert stats.scores(adam=True) != scores  # grad-adam has no per-example terms, and is read as before


def test_exact_contributions_against_given_sides_sum_to_the_exact_score(pieces):
    lm, model, train, domains, spec = pieces
    doms = domain_side(lm, model, domains)
    names = list(doms.domains)
    keep = PerExample(against=torch.stack([doms.domains[d] for d in names]))
    stats = GradientStats.join(training_side(lm, model, train, spec, keep=keep, against=names), doms)
    parts = stats.contributions()
    assert parts is not None
    _, grads, tokens = _by_hand(lm, model, train, spec)
    share = tokens / tokens.sum()
    plain = GradientStats.join(training_side(lm, model, train, spec), doms).scores()
    for d in names:
        want = share * (grads @ doms.domains[d].double())
        assert_same_reduction(parts[d], want, length=2 * TINY_FORWARD + int(tokens.sum()),
                              scale=float(want.abs().max()))
        assert stats.scores()[d] == float(parts[d].sum())
        assert_same_reduction(torch.tensor(plain[d]), torch.tensor(float(parts[d].sum())),
                              length=2 * TINY_FORWARD + int(tokens.sum()), scale=float(want.abs().sum()))


def test_rows_survive_the_cache_and_name_the_examples_they_came_from(pieces, tmp_path):
    """A record without a response has no row: each row names its record's position."""
    lm, model, train, domains, spec = pieces
    import dataclasses

    mixed = [dataclasses.replace(train[0], response="")] + list(train)
    keep = PerExample(dim=DIM)
    side = training_side(lm, model, mixed, spec, keep=keep).sketched(DIM)
    assert side.row_index == list(range(1, len(mixed)))
    side.save(tmp_path / "t.safetensors")
    back = TrainingGradients.load(tmp_path / "t.safetensors")
    assert back.row_index == side.row_index and torch.equal(back.rows, side.rows)
    assert torch.equal(back.row_tokens, side.row_tokens) and torch.equal(back.mean, side.mean)
    with pytest.raises(ValueError):
        PerExample(dim=DIM, against=torch.zeros(1, 3))


@pytest.mark.parametrize("sketch", ["4096", "0"])
def test_sts_predict_prints_and_writes_each_examples_terms_which_sum_to_the_scores(
        run_cli, tmp_path, model_dirs, sae_dirs, qa_file, domain_file, monkeypatch, sketch):
    import csv
    import json

    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["predict", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
            "--domains", str(domain_file), "--score", "grad", "--gradient-sketch", sketch, "--out", str(out)]
    printed = run_cli(argv).out
    result = json.loads((out / "sts.json").read_text())
    a = result["attribution"]
    assert a["form"] == ("exact" if sketch == "0" else f"count sketch of {sketch}")
    assert [e["position"] for e in a["examples"]] == list(range(5))
    for j, d in enumerate(a["domains"]):
        assert float(torch.tensor([row[j] for row in a["terms"]], dtype=torch.float64).sum()) == result["scores"][d]
    with open(out / "attribution.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and set(a["domains"]) <= set(rows[0])
    for d in a["domains"]:  # the CSV holds the same terms, to the last bit
        assert float(torch.tensor([float(r[d]) for r in rows], dtype=torch.float64).sum()) == result["scores"][d]
    # the report names, for the top domain, the example with the largest term first
    top = result["ranking"][0]["domain"]
    col = [row[a["domains"].index(top)] for row in a["terms"]]
    best = max(range(5), key=lambda i: (col[i], -i))
    block = printed.split(f"  {top} (grad")[1]
    assert block.splitlines()[1].split()[0] == "most" and f"#{best} " in block.splitlines()[1]
    assert printed.index("which examples move each domain") < printed.index("shifted features")
    # grad-adam divides G as a whole: no terms, and no stale file from the grad run
    again = run_cli([*argv[:-6], "--score", "grad-adam", "--gradient-sketch", sketch, "--out", str(out)])
    assert json.loads((out / "sts.json").read_text())["attribution"] is None
    # the training side the grad run kept (with its rows or products) serves it: the plan computes none
    assert "gradients of 5 examples" not in again.err and "gradients: 5 training examples" not in again.err
    assert not (out / "attribution.csv").exists()
