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

    from sts.stats import load_stats

    s, d = load_stats(shift), load_stats(dom)
    diff = s.sum_sq_diff
    top = torch.sort(diff, descending=True, stable=True).indices[:5]
    assert got["shifted_features"] == top.tolist()
    assert diff[top[0]] >= diff[top[-1]] > 0
    assert got["scores"]["text"] == pytest.approx(float((d.a.sum_sq / d.a.count)[top].mean()))
