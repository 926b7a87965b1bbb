"""Several training sets and mixtures at once (`sts.prediction.compare`, `sts.engine.mixture`), and the
calibration into the metric's units (`sts.analysis.calibration`), on tiny models and small libraries."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from sts.analysis.calibration import HELPS, HURTS, UNCLEAR, conformal_quantile, evaluate, fit
from sts.analysis.library import Library, LibrarySet, sae_identity, side_label, zscores
from sts.engine.mixture import Candidate, Part, candidates, mixed_examples, parse_part
from sts.errors import UserError
from sts.prediction.compare import predict
from sts.prediction.config import PredictConfig

from .conftest import write_jsonl

QA = [("What is 2 + 3?", "Add the numbers: 2 + 3 = 5."), ("Solve 2x = 8.", "Divide both sides by 2, so x = 4."),
      ("What is 12 times 12?", "Compute 12 times 12. The answer is 144."),
      ("Derivative of x squared?", "The derivative of x squared is two x."), ("What is 9 - 4?", "Subtract: 9 - 4 = 5.")]
TALK = [("Say hello.", "Hello there, nice to meet you."), ("Name a colour.", "Blue is a colour of the sky."),
        ("Who writes laws?", "Parliaments write the laws of a country.")]


def _records(pairs):
    return [{"question": q, "solution": s, "answer": "x"} for q, s in pairs]


@pytest.fixture
def two_sets(tmp_path):
    return (write_jsonl(tmp_path / "a.jsonl", _records(QA[:3])), write_jsonl(tmp_path / "b.jsonl", _records(TALK)))


@pytest.fixture
def tuned_dir(tmp_path):
    """A "fine-tuned" tiny llama: the base weights with layer 1 nudged (the sft shift's other side)."""
    from .conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "tuned")
    tok.save_pretrained(tmp_path / "tuned")
    return tmp_path / "tuned"


# --- parsing ---------------------------------------------------------------------------------

def test_a_weight_is_a_trailing_number_and_mixtures_normalise():
    assert parse_part("embedded:champ") == Part("embedded:champ", None)
    assert parse_part("embedded:champ:0.7") == Part("embedded:champ", 0.7)
    assert parse_part("data.jsonl#category=math:3") == Part("data.jsonl#category=math", 3.0)
    assert parse_part("data.jsonl#rows=100:200") == Part("data.jsonl#rows=100:200", None)  # a slice, not a weight
    assert parse_part("embedded:champ#rows=100:200:0.25") == Part("embedded:champ#rows=100:200", 0.25)
    (mix,) = candidates(["a:3", "b:1"])
    assert mix.parts == (Part("a", 0.75), Part("b", 0.25)) and mix.is_mixture
    grid = candidates(["a", "b"], grid=4)
    assert [c.name for c in grid[:2]] == ["a", "b"]
    assert sorted(tuple(p.weight for p in c.parts) for c in grid[2:]) == [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25)]
    assert len(candidates(["a", "b", "c"], grid=2)) == 3 + 3  # three sets, and the three 50/50 pairs
    for bad, match in [(["a:1", "b"], "weight every"), (["a:0.5"], "several sets"), (["a:-1", "b:1"], "positive"),
                       (["a", "a"], "twice"), (["a", "b", "c", "d"], "2 or 3")]:
        with pytest.raises(UserError, match=match):
            candidates(bad, grid=2 if match == "2 or 3" else 0)


def test_finetune_draws_each_parts_share_seeded():
    mix = Candidate((Part("a", 0.7), Part("b", 0.3)))
    pools = {"a": [f"a{i}" for i in range(5)], "b": [f"b{i}" for i in range(50)]}
    drawn, counts = mixed_examples(mix, pools, 20, seed=0)
    assert counts == {"a": 14, "b": 6} and len(drawn) == 20
    assert sum(x.startswith("a") for x in drawn) == 14 and len(set(x for x in drawn if x.startswith("a"))) == 5
    assert mixed_examples(mix, pools, 20, seed=0)[0] == drawn != mixed_examples(mix, pools, 20, seed=1)[0]


# --- a mixture's prediction from its parts ---------------------------------------------------

@pytest.mark.parametrize("score", ["act", "grad-adam"])
def test_a_mixture_is_predicted_as_the_file_holding_the_mixed_examples(tmp_path, model_dirs, sae_dirs, domain_file,
                                                                     tuned_dir, monkeypatch, score):
    """A has 2 examples and B 3: A:0.4 + B:0.6 weighs each A example 0.2 and each B example 0.2,
    so the mixture is the file holding each example once; A:0.5 + B:0.5 is the file holding A's
    examples three times and B's twice. The sft shift (and the gradients) read each example on
    its own, so the parts' statistics must add up to the file's exactly."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    a, b = QA[:2], TALK
    fa = write_jsonl(tmp_path / "a.jsonl", _records(a))
    fb = write_jsonl(tmp_path / "b.jsonl", _records(b))
    common = dict(model=str(model_dirs["llama"]), sae=str(sae_dirs["topk"]), domains=str(domain_file),
                  score=score, library="", top_contexts=0)
    if score == "act":
        common |= dict(method="sft", tuned_model=str(tuned_dir), k=8)
    for weights, (ma, mb) in [((0.4, 0.6), (1, 1)), ((0.5, 0.5), (3, 2))]:
        mixed = write_jsonl(tmp_path / f"mixed-{ma}-{mb}.jsonl", _records(a * ma + b * mb))
        comp = predict(PredictConfig(train=[f"{fa}:{weights[0]}", f"{fb}:{weights[1]}"], **common))
        (name,) = comp.candidates
        alone = predict(PredictConfig(train=str(mixed), **common))
        got = comp.predictions[name].scores
        assert got == pytest.approx(alone.scores, rel=1e-6, abs=1e-9)
        assert len(set(np.round(list(got.values()), 9))) > 1  # a ranking, not a constant


def test_compare_two_sets_and_a_grid_writes_one_table(tmp_path, run_cli, model_dirs, sae_dirs, domain_file,
                                                      two_sets, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    fa, fb = two_sets
    out = tmp_path / "out"
    argv = ["predict", "--model", model_dirs["llama"], "--sae", sae_dirs["topk"], "--domains", domain_file,
            "--train", fa, "--train", fb, "--mix-grid", "2", "--target", "math", "--k", "8", "--score", "act",
            "--out", out]  # act: its margin has a bootstrap over the training examples (grad's has none yet)
    result = run_cli(argv)
    rows = list(csv.DictReader((out / "sts.csv").open()))
    names = {r["candidate"] for r in rows}
    assert names == {str(fa), str(fb), f"0.50 {fa} + 0.50 {fb}"} and len(rows) == 3 * 3
    doc = json.loads((out / "sts.json").read_text())
    for d in ("math", "law", "biology"):  # the best mark is the highest score of the domain
        by = sorted(((float(r["score"]), r["candidate"]) for r in rows if r["domain"] == d), reverse=True)
        tied = np.isclose(by[0][0], by[1][0], rtol=1e-9, atol=1e-12)  # then no candidate is marked
        assert doc["best"][d] == (None if tied else by[0][1])
        assert [r["best"] for r in rows if r["domain"] == d].count("True") == (0 if tied else 1)
    assert doc["targets"] == ["math"] and doc["margin"]["first"] == max(doc["target_values"],
                                                                       key=doc["target_values"].get)
    assert doc["margin"]["se"] > 0  # the bootstrap over training examples (icl shift samples)
    assert "for math:" in result.out and "margin S" in result.out and "uncalibrated" in result.out
    assert (out / "sts.png").stat().st_size > 0
    # the sets' statistics came from the cache the second time
    again = run_cli(argv)
    assert "shift (" not in again.err


def test_target_over_plain_sets_scores_the_default_grid(two_sets):
    """--target among 2-3 unweighted sets asks which set or mixture to train on: the grid of
    defaults.TARGET_MIX_GRID is scored unless --mix-grid says otherwise."""
    from sts import defaults
    from sts.engine.mixture import candidates

    fa, fb = (str(f) for f in two_sets)
    n = defaults.TARGET_MIX_GRID
    cfg = PredictConfig(train=[fa, fb], target=["math"])
    assert cfg.mix_grid == n
    names = {c.name for c in candidates(cfg.train, cfg.mix_grid)}
    assert len(names) == 2 + (n - 1) and f"{1 / n:.2f} {fa} + {1 - 1 / n:.2f} {fb}" in names
    assert PredictConfig(train=[fa, fb]).mix_grid == 0  # no target: the sets alone
    assert PredictConfig(train=[fa, fb], target=["math"], mix_grid=0).mix_grid == 0
    assert PredictConfig(train=[f"{fa}:0.3", f"{fb}:0.7"], target=["math"]).mix_grid == 0  # already a mixture


def test_bad_comparisons_fail_in_one_line(tmp_path, cli_fails, model_dirs, sae_dirs, domain_file, two_sets):
    fa, fb = two_sets
    base = ["predict", "--model", model_dirs["llama"], "--sae", sae_dirs["topk"], "--domains", domain_file, "--k", "8"]
    cli_fails([*base, "--train", fa, "--train", fb, "--target", "astrology"], "--target astrology", "law")
    cli_fails([*base, "--train", fa, "--target", "math"], "--target")
    cli_fails([*base, "--train", fa, "--mix-grid", "3"], "--mix-grid")
    cli_fails([*base, "--train", f"{fa}:0.5", "--train", fb], "weight every")
    cli_fails([*base, "--train", f"{fa}:0.5", "--train", f"{fb}:0.5", "--score", "lexical"], "lexical")


# --- calibration -------------------------------------------------------------------------------

DOMAINS = ["a", "b", "c", "d", "e"]


def _library(n_sets: int = 6, own: float = 0.0, seed: int = 0, sae: str = "sae-sha") -> Library:
    """Sets whose change is a domain effect, plus `own` times their score's own part, plus noise."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(size=5)
    sets = {}
    for i in range(n_sets):
        score = dict(zip(DOMAINS, rng.normal(size=5)))
        z = zscores(score, DOMAINS)
        change = {d: effect[j] + own * z[d] + 0.1 * rng.normal() for j, d in enumerate(DOMAINS)}
        sets[f"s{i}"] = LibrarySet(f"spec{i}", {"act": score}, {"nll": change})
    return Library(sae, "m", 10, "nll", sets)


def test_calibration_keeps_the_own_slope_only_where_it_predicts():
    flat = fit(_library(own=0.0).sets, "act", "nll")
    steep = fit(_library(own=1.0).sets, "act", "nll")
    assert steep.model in ("M1", "M2") and steep.fit.slope == pytest.approx(1.0, abs=0.25)
    assert steep.loso_rmse["M1"] < steep.loso_rmse["M0"]
    assert flat.loso_rmse[flat.model] <= flat.loso_rmse["M0"]


def test_intervals_equal_a_direct_conformal_computation():
    lib = _library(own=0.0)
    cal = fit(lib.sets, "act", "nll", level=0.8)
    assert cal.model == "M0"  # noise only: nothing beyond the domain means
    # by hand: each set's residual against the other sets' domain means, over that domain's spread
    names = sorted(lib.sets)
    change = np.array([[lib.sets[n].changes["nll"][d] for d in DOMAINS] for n in names])
    mu = change.mean(0)
    spread = np.sqrt(((change - mu) ** 2).mean(0))
    loso = np.array([np.delete(change, i, 0).mean(0) for i in range(len(names))])
    r = (np.abs(change - loso) / spread).ravel()
    q = np.sort(r)[math.ceil((r.size + 1) * 0.8) - 1]
    assert cal.halfwidth == pytest.approx(q) and conformal_quantile(list(r), 0.8) == pytest.approx(q)
    new = {d: float(v) for d, v in zip(DOMAINS, [3.0, 1.0, 2.0, 0.5, 0.0])}
    for j, d in enumerate(DOMAINS):
        c = cal.predict(new)[d]
        assert (c.value, c.low, c.high) == pytest.approx((mu[j], mu[j] - q * spread[j], mu[j] + q * spread[j]))
        assert c.call == (HELPS if c.low > 0 else HURTS if c.high < 0 else UNCLEAR)


def test_leave_one_set_out_record_refits_without_each_set():
    lib = _library(n_sets=6, own=1.0)
    ev = evaluate(lib.sets, "act", "nll")
    assert ev.cells == 6 * 5 and 0 <= ev.sign_accuracy <= 1 and 0 <= ev.coverage <= 1
    assert ev.rmse < ev.rmse_domain_mean  # the own part is real here: the slope must help
    with pytest.raises(UserError, match="at least 3"):
        fit(_library(n_sets=2).sets, "act", "nll")


def test_calibrate_refuses_a_library_of_another_sae_or_model(tmp_path, cli_fails, model_dirs, sae_dirs, domain_file,
                                                            two_sets):
    fa, _ = two_sets
    base = ["predict", "--model", model_dirs["llama"], "--sae", sae_dirs["topk"], "--domains", domain_file,
            "--train", fa, "--k", "8", "--score", "act"]
    other_sae = _library(sae="another")
    other_sae.k = 8
    other_sae.save(tmp_path / "other-sae.json")
    cli_fails([*base, "--calibrate", tmp_path / "other-sae.json"], "--calibrate", "another SAE")
    other_model = _library(sae=sae_identity(str(sae_dirs["topk"])))
    other_model.k, other_model.model = 8, "some-other-model"
    other_model.save(tmp_path / "other-model.json")
    cli_fails([*base, "--calibrate", tmp_path / "other-model.json"], "--calibrate", "some-other-model")


def test_predict_prints_calibrated_changes_from_a_matching_library(tmp_path, run_cli, model_dirs, sae_dirs,
                                                                   domain_file, two_sets, monkeypatch):
    """A library measured on this model and SAE (domains math, law, biology): `--calibrate` turns
    the prediction into signed changes with intervals, and leaves the set's own run out."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    fa, fb = two_sets
    rng = np.random.default_rng(0)
    doms = ["math", "law", "biology"]
    sets = {f"s{i}": LibrarySet(f"x{i}.jsonl", {"act": dict(zip(doms, rng.normal(size=3)))},
                                {"nll": dict(zip(doms, [0.5, -0.4, 0.01] + 0.05 * rng.normal(size=3)))})
            for i in range(5)}
    sets["own"] = LibrarySet(fa.name, {"act": dict(zip(doms, [1.0, 2.0, 3.0]))}, {"nll": dict.fromkeys(doms, 9.0)})
    lib = Library(sae_identity(str(sae_dirs["topk"])), str(model_dirs["llama"]), 8, "nll", sets,
                  sides={"act": side_label(False, str(domain_file), ())})  # its act read these domains' questions
    lib.save(tmp_path / "library.json")
    out = tmp_path / "out"
    result = run_cli(["predict", "--model", model_dirs["llama"], "--sae", sae_dirs["topk"], "--domains", domain_file,
                      "--train", fa, "--k", "8", "--score", "act", "--calibrate", tmp_path / "library.json",
                      "--out", out])
    doc = json.loads((out / "sts.json").read_text())
    assert doc["calibration"]["nll"]["sets"] == [f"s{i}" for i in range(5)]  # its own run (9.0) left out
    math_change = doc["changes"]["nll"]["math"]
    assert math_change["low"] < math_change["value"] < math_change["high"] < 9
    assert "leave-one-set-out record" in result.out and "nats/token" in result.out
    assert "act ranks, as validated: read on plain questions, over 10 measured sets" in result.out  # what it predicts
    row = next(csv.DictReader((out / "sts.csv").open()))
    assert {"nll_change", "low", "high", "call"} <= set(row)
    # comparing two sets for a target: each set's interval and call on it, as its prediction holds them
    result = run_cli(["predict", "--model", model_dirs["llama"], "--sae", sae_dirs["topk"], "--domains", domain_file,
                      "--train", fa, "--train", fb, "--target", "math", "--mix-grid", "0", "--k", "8", "--score",
                      "act", "--calibrate", tmp_path / "library.json", "--out", out])
    rows = {r["candidate"]: r for r in csv.DictReader((out / "sts.csv").open()) if r["domain"] == "math"}
    for c, r in rows.items():
        line = next(x for x in result.out.splitlines() if x.endswith(f"  {c}") and ". S" in x)
        assert f"[{float(r['low']):+.3g}, {float(r['high']):+.3g}] {r['call']}" in line


def test_a_library_of_another_domain_side_is_reported_not_applied(tmp_path, run_cli, model_dirs, sae_dirs,
                                                                   domain_file, two_sets, monkeypatch):
    """A library whose scores read another kind of domain side (here: another domain set's
    questions; a library that does not say): one line says so, and neither the shared / own split
    nor the calibration is applied (their scales would mix)."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    fa, _ = two_sets
    lib = _library(sae=sae_identity(str(sae_dirs["topk"])))
    lib.k, lib.model = 8, str(model_dirs["llama"])
    lib.sets = {n: LibrarySet(s.spec, {"act": dict(zip(["math", "law", "biology"], s.scores["act"].values()))},
                              {"nll": dict(zip(["math", "law", "biology"], s.changes["nll"].values()))})
                for n, s in lib.sets.items()}
    base = ["predict", "--model", model_dirs["llama"], "--sae", sae_dirs["topk"], "--domains", domain_file,
            "--train", fa, "--k", "8", "--score", "act"]
    for sides, said in (({"act": "other.jsonl: questions"}, "read other.jsonl: questions, this prediction"),
                        ({}, "does not say what its act scores read")):
        lib.sides = sides
        lib.save(tmp_path / "library.json")
        out = tmp_path / f"out{len(sides)}"
        result = run_cli([*base, "--calibrate", tmp_path / "library.json", "--library", tmp_path / "library.json",
                          "--out", out])
        doc = json.loads((out / "sts.json").read_text())
        assert said in result.out and "no calibration" in result.out and "no shared/own decomposition" in result.out
        assert not doc.get("changes") and not doc.get("decomposition")
        assert "nll_change" not in next(csv.DictReader((out / "sts.csv").open()))


def test_finetune_trains_on_the_mixture_it_reports(tmp_path, run_cli, model_dirs, two_sets):
    fa, fb = two_sets
    out = tmp_path / "tuned"
    result = run_cli(["finetune", "--model", model_dirs["llama"], "--train", f"{fa}:0.75", "--train", f"{fb}:0.25",
                      "--max-train", "8", "--max-steps", "1", "--batch-size", "2", "--out", out])
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["examples"] == 8 and [(m["spec"], m["examples"]) for m in meta["mixture"]] == [(str(fa), 6),
                                                                                             (str(fb), 2)]
    assert "0.75" in result.out


def test_the_picture_draws_each_domains_calibrated_change_with_its_interval_and_call(
        tmp_path, model_dirs, sae_dirs, domain_file, two_sets, monkeypatch):
    """out/sts.png draws `report.figure`'s data: with a calibration, each domain's predicted change,
    its interval and call, ordered by the change, and the set's own part; the title names the shift
    and k only for a score that reads them. Without one, the raw score labelled with its formula."""
    from sts.prediction.report import figure
    from sts.scores.score import spec_of

    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    fa, _ = two_sets
    doms = ["math", "law", "biology"]
    rng = np.random.default_rng(1)
    sets = {f"s{i}": LibrarySet(f"x{i}.jsonl", {"act": dict(zip(doms, rng.normal(size=3)))},
                                {"nll": dict(zip(doms, [0.5, -0.4, 0.01] + 0.05 * rng.normal(size=3)))})
            for i in range(5)}
    Library(sae_identity(str(sae_dirs["topk"])), str(model_dirs["llama"]), 8, "nll", sets,
            sides={"act": side_label(False, str(domain_file), ())}).save(tmp_path / "library.json")
    common = dict(model=str(model_dirs["llama"]), sae=str(sae_dirs["topk"]), domains=str(domain_file), train=str(fa))
    pred = predict(PredictConfig(**common, k=8, score="act", library=str(tmp_path / "library.json")))
    fig = figure(pred)
    changes = pred.changes["nll"]
    assert fig.calibrated and sorted(fig.domains) == sorted(doms)
    assert fig.values == sorted(fig.values, reverse=True)  # ordered by the predicted change
    for i, d in enumerate(fig.domains):
        assert (fig.values[i], fig.low[i], fig.high[i], fig.calls[i]) == (
            changes[d].value, changes[d].low, changes[d].high, changes[d].call)
        assert fig.low[i] < fig.values[i] < fig.high[i]
        assert fig.calls[i] == (HELPS if fig.low[i] > 0 else HURTS if fig.high[i] < 0 else UNCLEAR)
        assert fig.own[i] == pred.decomposition.own[d]
    assert "(act, icl shift, k=8; calibrated on 5 runs)" in fig.title and "90% interval" in fig.xlabel
    assert "nll" in fig.title and "nats/token" in fig.xlabel
    raw = predict(PredictConfig(**common, score="grad", library="none"))
    fig = figure(raw)
    assert not fig.calibrated and fig.own is None
    assert fig.values == [v for _, _, v, _ in raw.ranking()] and fig.domains == [d for _, d, _, _ in raw.ranking()]
    assert "shift" not in fig.title and "k=" not in fig.title and "grad" in fig.title  # grad reads neither
    assert fig.xlabel == spec_of("grad").label and "raw score" in fig.note
