"""The scores past the first step on a tiny model: Adam's first moving update is what `sts
finetune`'s optimizer applies, the line along it agrees with the analytic first-order term as the
step shrinks, and the lookahead is the fine-tuning run itself stopped at step k."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sts.data.datasets import load_dataset
from sts.engine.finetuning import finetune
from sts.engine.gradients import (
    ADAM_EPS,
    MAX_GRAD_NORM,
    GradientStats,
    adapted,
    domain_losses,
    first_update,
    gradient_stats,
)
from sts.engine.lookahead import check_steps, flat_state, load_state, lookahead, moved_losses, recipe
from sts.engine.models import load_model, plain_model
from sts.engine.settings import FinetuneSpec
from sts.errors import UserError


@pytest.fixture
def setup(model_dirs, qa_file, domain_file):
    lm = load_model(str(model_dirs["llama"]))
    return lm, load_dataset(str(qa_file)).examples, load_dataset(str(domain_file)).by_domain()


def test_the_recipe_is_the_trainers_schedule_and_optimizer():
    rec = recipe(FinetuneSpec())  # lr 2e-4, 5 warm-up steps of 60, linear
    assert rec.lrs[0] == 0 and rec.lrs[1] == pytest.approx(4e-5) and rec.lrs[5] == pytest.approx(2e-4)
    assert len(rec.lrs) == 60 and rec.reach(10) == pytest.approx(2e-4 * (2 + 265 / 55))
    assert rec.reach(60) == pytest.approx(2e-4 * 30)
    assert (rec.eps, rec.max_norm) == (ADAM_EPS, MAX_GRAD_NORM)  # first_update's defaults are the trainer's
    with pytest.raises(UserError, match="move nothing"):
        check_steps(1, FinetuneSpec())
    with pytest.raises(UserError, match="between 1 and"):
        check_steps(61, FinetuneSpec())


def test_adams_first_moving_update_is_what_the_trainer_applies(setup):
    """One batch holds the whole set, so each step's gradient is G: step 1 moves nothing (the
    warm-up starts at lr 0) and step 2 moves by -lr_2 x first_update(G)."""
    lm, train, domains = setup
    spec = FinetuneSpec(lora_r=4, lora_dropout=0.0, batch_size=len(train), seed=2)
    look = lookahead(lm, train, spec, (1, 2))
    model = adapted(lm, spec)
    assert torch.equal(look.start, flat_state(model))  # the trainer starts where the gradient scores read
    assert torch.equal(look.states[1], look.start)
    g = gradient_stats(lm, train, domains, spec).train_mean
    expected = -recipe(spec).lrs[1] * first_update(g).float()
    moved = look.states[2] - look.states[1]
    assert moved.abs().max() > 0
    assert torch.allclose(moved, expected, atol=2e-3 * recipe(spec).lrs[1], rtol=0)
    # Adam's step is sign-like: every coordinate with a gradient moves by about lr_2
    nonzero = g.abs() > 1e-6
    assert torch.allclose(moved[nonzero].abs(), torch.full_like(moved[nonzero], recipe(spec).lrs[1]), rtol=1e-2)


def test_the_line_agrees_with_the_first_order_term_as_the_step_shrinks(setup):
    lm, train, domains = setup
    spec = FinetuneSpec(lora_r=4, seed=1)
    stats = gradient_stats(lm, train, domains, spec)
    model = adapted(lm, spec)
    start = flat_state(model)
    base = domain_losses(lm, model, domains)
    # (direction, its analytic first-order term, a step small enough for the term and large enough
    # for float32's round-off): the finite difference along the line converges to the term
    for direction, analytic, small in ((stats.train_mean.double(), stats.scores(), 1e-3),
                                       (first_update(stats.train_mean), stats.scores(sign=True), 1e-2)):
        scale = max(abs(v) for v in analytic.values())
        errors = []
        for s in (1.0, small):
            step = s / float(direction.norm())
            load_state(model, start - (step * direction).float())
            moved = domain_losses(lm, model, domains)
            errors.append(max(abs((base[d] - moved[d]) / step - analytic[d]) for d in domains) / scale)
        assert errors[1] < 0.03 < errors[0]  # near s = 0 the term, far from it the curvature


def test_the_lookahead_is_the_fine_tuning_run_stopped_at_step_k(setup, tmp_path):
    lm, train, domains = setup
    spec = FinetuneSpec(lora_r=4, max_steps=4, batch_size=2, seed=5)
    look = lookahead(lm, train, spec, (2, 4))
    assert torch.equal(lookahead(lm, train, spec, (2,)).states[2], look.states[2])  # stopping changes nothing before
    finetune(lm, train, spec, tmp_path / "tuned")  # the whole run: 4 steps
    tuned = load_model(str(tmp_path / "tuned"))
    direct = domain_losses(tuned, plain_model(tuned.model), domains)
    ours = moved_losses(lm, spec, domains, {"4": look.states[4]})["4"]
    base = domain_losses(lm, adapted(lm, spec), domains)
    for d in domains:
        assert ours[d] == pytest.approx(direct[d], abs=1e-4)
        assert abs(base[d] - ours[d]) > 1e-4  # the run moved the domain's loss
    assert not torch.equal(look.states[2], look.states[4])


def test_activation_checkpointing_changes_no_step_of_the_lookahead(setup):
    """The same run with the trainer's gradient checkpointing (less memory: recomputed activations,
    dropout masks replayed from the saved RNG state) reaches the same adapter."""
    lm, train, _ = setup
    spec = FinetuneSpec(lora_r=4, max_steps=4, batch_size=2, seed=5)
    plain = lookahead(lm, train, spec, (2, 4))
    checkpointed = lookahead(lm, train, dataclasses.replace(spec, gradient_checkpointing=True), (2, 4))
    for k in (2, 4):
        assert torch.allclose(checkpointed.states[k], plain.states[k], atol=1e-6, rtol=1e-5)
    assert not torch.equal(plain.states[2], plain.states[4])


def test_a_state_of_the_wrong_size_is_refused(setup):
    lm, _, _ = setup
    model = adapted(lm, dataclasses.replace(FinetuneSpec(), lora_r=4))
    with pytest.raises(ValueError, match="a state of"):
        load_state(model, torch.zeros(flat_state(model).numel() + 1))


def test_sts_predict_runs_each_score_past_the_first_step(run_cli, tmp_path, model_dirs, sae_dirs, qa_file,
                                                          domain_file, monkeypatch):
    """grad-sign, line, look and look-fo end to end, each equal to the direct computation."""
    from sts.engine.gradients import DomainGradients
    from sts.engine.lookahead import drops, line_point

    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    lm = load_model(str(model_dirs["llama"]))
    train, domains = load_dataset(str(qa_file)).examples, load_dataset(str(domain_file)).by_domain()
    spec = FinetuneSpec()  # sts predict's recipe: 60 steps of 4, the ones the lookahead takes
    stats = gradient_stats(lm, train, domains, spec)
    look = lookahead(lm, train, spec, (3,))
    base = domain_losses(lm, adapted(lm, spec), domains)
    want = {"grad-sign": stats.scores(sign=True),
            "look": drops(base, moved_losses(lm, spec, domains, {"k": look.states[3]})["k"]),
            "line": drops(base, moved_losses(lm, spec, domains, {"k": line_point(spec, stats.train_mean,
                                                                                  look.start, 3)})["k"]),
            "look-fo": GradientStats.join(_train(stats), DomainGradients(stats.domains, stats.records)
                                          ).along(-look.displacement(3).double())}
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
              "--domains", str(domain_file), "--no-explain", "--out", str(tmp_path / "out")]
    for score, expected in want.items():
        steps = [] if score == "grad-sign" else ["--steps", "3"]
        exact = ["--gradient-sketch", "0"] if score in ("grad-sign", "look-fo") else []
        result = run_cli(["predict", *common, "--score", score, *steps, *exact])
        got = json.loads((tmp_path / "out" / "sts.json").read_text())
        assert got["score"] == score and got["scores"] == pytest.approx(expected, rel=1e-4, abs=1e-7), score
        if score == "look":
            assert "3 optimizer steps of the fine-tuning run" in result.err
    # the run's steps are cached
    again = run_cli(["predict", *common, "--score", "look-fo", "--steps", "3", "--gradient-sketch", "0"])
    assert "optimizer steps" not in again.err


def _train(stats: GradientStats):
    from sts.engine.gradients import TrainingGradients

    return TrainingGradients(stats.train_mean, stats.train_sq, stats.examples, stats.tokens)


def test_bad_lookahead_input_is_one_line_and_status_2(run_cli, tmp_path):
    sealed = run_cli(["predict", "--score", "look", "--out", str(tmp_path / "a")], expect=2)
    assert "ship no text" in sealed.err and "look-fo" in sealed.err and "Traceback" not in sealed.err
    first = run_cli(["predict", "--score", "look-fo", "--steps", "1", "--out", str(tmp_path / "b")], expect=2)
    assert "move nothing" in first.err
    unused = run_cli(["predict", "--score", "grad", "--steps", "5", "--out", str(tmp_path / "c")], expect=2)
    assert "--steps" in unused.err
    assert run_cli(["validate", "--score", "look", "--out", str(tmp_path / "d")], expect=2).err.count("\n") == 1
    mixed = run_cli(["predict", "--score", "look-fo", "--train", "embedded:champ:0.5", "--train",
                     "embedded:mmlu#category=math:0.5", "--out", str(tmp_path / "e")], expect=2)
    assert "no mixture" in mixed.err
    assert not any((tmp_path / n).exists() for n in "abcde")
