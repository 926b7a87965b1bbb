"""Scoring: the reference's `paper` formulas on dense tensors, and scores from statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def _reference_scores(base, shifted, domains, k, n):
    """DESIGN.md's reference formulas, written directly in numpy on dense arrays."""
    b, s = base[:n].astype(np.float64), shifted[:n].astype(np.float64)
    shift = ((s - b) ** 2).sum(axis=0)
    top = np.argsort(-shift, kind="stable")[:k]
    scores = {name: float(np.mean([np.mean(d[:n, j].astype(np.float64) ** 2) for j in top]))
              for name, d in domains.items()}
    return top.tolist(), scores


def _sparse_features(rng, rows, width):
    x = rng.standard_normal((rows, width)).astype(np.float32)
    return np.maximum(x, 0) * (rng.random((rows, width)) < 0.3)


@pytest.mark.parametrize("rows,max_tokens,k", [(300, 200, 10), (10_050, None, 100)])
def test_paper_scores_equal_direct_dense_implementation(tmp_path, run_cli, rows, max_tokens, k):
    rng = np.random.default_rng(0)
    width = 128
    base, shifted = _sparse_features(rng, rows, width), _sparse_features(rng, rows - 3, width)
    domains = {"math": _sparse_features(rng, rows + 5, width), "law": _sparse_features(rng, 40, width) * 2}
    for name, arr in [("base", base), ("shifted", shifted)] + list(domains.items()):
        torch.save(torch.from_numpy(arr), tmp_path / f"{name}.pt")
    argv = ["score", "--method", "paper", "--base", str(tmp_path / "base.pt"),
            "--shifted", str(tmp_path / "shifted.pt"), "--k", str(k), "--out", str(tmp_path / "s.json")]
    argv += [a for name in domains for a in ("--domain", f"{name}={tmp_path / name}.pt")]
    if max_tokens is not None:
        argv += ["--max-tokens", str(max_tokens)]
    result = run_cli(argv)
    got = json.loads((tmp_path / "s.json").read_text())
    top, scores = _reference_scores(base, shifted, domains, k, max_tokens or 10_000)
    assert set(got) == {"score", "formula", "method", "k", "shifted_features", "scores"} and got["score"] == "sq"
    assert got["method"] == "paper" and got["k"] == k
    assert got["shifted_features"] == top
    assert got["scores"].keys() == scores.keys()
    for name in scores:
        assert got["scores"][name] == pytest.approx(scores[name], rel=1e-9)
    assert "math" in result.out  # a ranking is printed too


def test_score_from_icl_statistics_files(tmp_path, run_cli, model_dirs, sae_dirs, qa_file, text_file):
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["standard"])]
    shift = tmp_path / "shift.safetensors"
    dom = tmp_path / "dom.safetensors"
    run_cli(["extract", *common, "--data", str(qa_file), "--shift", "icl", "--out", str(shift)])
    run_cli(["extract", *common, "--data", str(text_file), "--out", str(dom)])
    out = tmp_path / "scores.json"
    run_cli(["score", "--shift-stats", str(shift), "--domain", f"text={dom}", "--k", "5",
            "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["method"] == "icl" and len(got["shifted_features"]) == 5

    from sts.engine.stats import load_stats

    s, d = load_stats(shift), load_stats(dom)
    diff = s.sum_sq_diff
    top = torch.sort(diff, descending=True, stable=True).indices[:5]
    assert got["shifted_features"] == top.tolist()
    assert diff[top[0]] >= diff[top[-1]] > 0
    assert got["scores"]["text"] == pytest.approx(float((d.a.sum_sq / d.a.count)[top].mean()))


def _paired_and_domains(tmp_path, scale: np.ndarray, tag: str):
    """Statistics files (as `sts extract` writes them) of a training pair and three domains,
    every feature's activations multiplied by `scale`. Feature 0 fires strongly and changes
    a little; features 1-5 fire weakly and change completely."""
    from sts.engine.stats import FeatureStats, PairedStats, RunStats

    rng = np.random.default_rng(0)
    width, rows = 30, 400
    f_a = _sparse_features(rng, rows, width)
    f_a[:, 0] = 50 + rng.random(rows)
    f_b = f_a.copy()
    f_b[:, 0] += rng.random(rows)  # large feature, small relative change
    f_b[:, 1:6] = _sparse_features(rng, rows, 5)  # small features, replaced
    f_a, f_b = f_a * scale, f_b * scale

    def stats(x: np.ndarray) -> FeatureStats:
        s = FeatureStats.zeros(width)
        s.update(torch.from_numpy(x))
        return s

    diff = torch.from_numpy(((f_b.astype(np.float64) - f_a) ** 2).sum(0))
    shift = tmp_path / f"shift-{tag}.safetensors"
    PairedStats(stats(f_a), stats(f_b), diff, {"shift": "icl", "readout": "sae"}).save(shift)
    domains = []
    for i, name in enumerate(("a", "b", "c")):
        x = _sparse_features(np.random.default_rng(10 + i), 200, width) * (1 + i * np.arange(width) / width)
        path = tmp_path / f"dom-{name}-{tag}.safetensors"
        RunStats(stats((x * scale).astype(np.float32)), {"readout": "sae"}).save(path)
        domains += ["--domain", f"{name}={path}"]
    return shift, domains


def test_scale_free_scores_ignore_each_features_scale(tmp_path, run_cli):
    """rel-act (docs/results/transfer/ADDENDUM.md): S by the share of a feature's own energy that
    the shift changes, domains by their usage relative to the domains' mean; rescaling any
    feature leaves it unchanged, where STS_act's S and scores move."""
    got = {}
    for tag, scale in (("one", np.ones(30)), ("rescaled", np.random.default_rng(3).uniform(0.1, 10, 30))):
        shift, domains = _paired_and_domains(tmp_path, scale.astype(np.float32), tag)
        for score in ("act", "rel-act"):
            out = tmp_path / f"{score}-{tag}.json"
            run_cli(["score", "--shift-stats", shift, *domains, "--score", score, "--k", "5", "--out", out])
            got[score, tag] = json.loads(out.read_text())
    rel, act = got["rel-act", "one"], got["act", "one"]
    assert sorted(rel["shifted_features"]) == [1, 2, 3, 4, 5]  # the features that changed, not the loud one
    assert 0 in act["shifted_features"]
    # the same S (its order among near-equal shares may move with eps, which is not per feature)
    assert sorted(got["rel-act", "rescaled"]["shifted_features"]) == sorted(rel["shifted_features"])
    for d in ("a", "b", "c"):
        assert got["rel-act", "rescaled"]["scores"][d] == pytest.approx(rel["scores"][d], rel=1e-5)
    assert got["act", "rescaled"]["scores"] != pytest.approx(act["scores"], rel=1e-2)
    # relative usage: the domains' mean of each feature is 1, so the scores average k
    assert np.mean(list(rel["scores"].values())) == pytest.approx(5, rel=1e-9)


def test_relative_usage_of_a_feature_no_domain_uses_is_zero():
    from sts.scores.features import relative_usage

    got = relative_usage({"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.0, 6.0])})
    assert got["a"].tolist() == [0.0, 0.5] and got["b"].tolist() == [0.0, 1.5]


def test_scale_free_score_on_dense_tensors_fails_cleanly(tmp_path, cli_fails):
    x = torch.rand(20, 8)
    for name in ("base", "shifted", "dom"):
        torch.save(x, tmp_path / f"{name}.pt")
    cli_fails(["score", "--base", tmp_path / "base.pt", "--shifted", tmp_path / "shifted.pt",
               "--domain", f"d={tmp_path / 'dom.pt'}", "--score", "rel-act", "--out", tmp_path / "o.json"],
              "statistics files", out=tmp_path / "o.json")
