"""Scoring: the reference's `paper` formulas on dense tensors, and scores from statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sts.cli import main


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


def _run(argv):
    exit_code = main(argv)
    return exit_code


@pytest.mark.parametrize("rows,max_tokens,k", [(300, 200, 10), (10_050, None, 100)])
def test_paper_scores_equal_direct_dense_implementation(tmp_path, capsys, rows, max_tokens, k):
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
    assert _run(argv) == 0
    got = json.loads((tmp_path / "s.json").read_text())
    top, scores = _reference_scores(base, shifted, domains, k, max_tokens or 10_000)
    assert set(got) == {"score", "formula", "method", "k", "shifted_features", "scores"} and got["score"] == "sq"
    assert got["method"] == "paper" and got["k"] == k
    assert got["shifted_features"] == top
    assert got["scores"].keys() == scores.keys()
    for name in scores:
        assert got["scores"][name] == pytest.approx(scores[name], rel=1e-9)
    assert "math" in capsys.readouterr().out  # a ranking is printed too


def test_score_from_icl_statistics_files(tmp_path, model_dirs, sae_dirs, qa_file, text_file):
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["standard"])]
    shift = tmp_path / "shift.safetensors"
    dom = tmp_path / "dom.safetensors"
    assert _run(["extract", *common, "--data", str(qa_file), "--shift", "icl", "--out", str(shift)]) == 0
    assert _run(["extract", *common, "--data", str(text_file), "--out", str(dom)]) == 0
    out = tmp_path / "scores.json"
    assert _run(["score", "--shift-stats", str(shift), "--domain", f"text={dom}", "--k", "5",
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["method"] == "icl" and len(got["shifted_features"]) == 5

    from sts.extract import Stats

    s, d = Stats.load(shift), Stats.load(dom)
    diff = s.sum_sq_diff
    top = torch.sort(diff, descending=True, stable=True).indices[:5]
    assert got["shifted_features"] == top.tolist()
    assert diff[top[0]] >= diff[top[-1]] > 0
    assert got["scores"]["text"] == pytest.approx(float((d.a.sum_sq / d.a.count)[top].mean()))


def test_extract_pt_matches_per_record_features_and_scores_like_paper(tmp_path, model_dirs, sae_dirs,
                                                                     text_file):
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conftest import CORPUS

    out = tmp_path / "feats.pt"
    argv = ["extract", "--model", str(model_dirs["gpt2"]), "--sae", str(sae_dirs["jumprelu"]),
            "--data", str(text_file), "--format", "pt", "--out", str(out), "--max-tokens", "40",
            "--batch-size", "3"]
    assert _run(argv) == 0
    feats = torch.load(out)
    assert feats.dtype == torch.float32 and feats.shape == (40, 96)
    tok = AutoTokenizer.from_pretrained(model_dirs["gpt2"])
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"]).eval()
    sae = SAE.load_from_disk(sae_dirs["jumprelu"])
    rows = []
    for text in CORPUS:  # tokens exactly tokenizer(text)["input_ids"], records in order
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            rows.append(sae.encode(model(ids, output_hidden_states=True).hidden_states[3][0]))
    torch.testing.assert_close(feats, torch.cat(rows)[:40], rtol=1e-5, atol=1e-5)


def test_sft_shift_compares_two_models_on_identical_tokens(tmp_path, model_dirs, sae_dirs, qa_file):
    from .conftest import make_model, make_tokenizer

    tuned = tmp_path / "tuned"
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    with torch.no_grad():  # a "fine-tuned" model: the same weights, layer 1 nudged
        for p in model.model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["standard"]), "--data", str(qa_file)]
    same, moved = tmp_path / "same.safetensors", tmp_path / "moved.safetensors"
    assert _run(["extract", *common, "--shift", "sft", "--tuned-model", str(model_dirs["llama"]),
                 "--out", str(same)]) == 0
    assert _run(["extract", *common, "--shift", "sft", "--tuned-model", str(tuned), "--out", str(moved)]) == 0

    from sts.extract import Stats

    s, m = Stats.load(same), Stats.load(moved)
    assert s.a.count == m.a.count > 0 and s.meta["shift"] == "sft"
    assert float(s.sum_sq_diff.max()) == 0.0  # the same model on the same tokens: no shift
    assert float(m.sum_sq_diff.max()) > 0.0
    torch.testing.assert_close(m.a.sum_sq, s.a.sum_sq)  # side a is the base model either way


def test_paper_shift_from_datasets_equals_dense_extraction(tmp_path, model_dirs, sae_dirs, qa_file):
    """`sts extract --shift paper` on a dataset == the reference formula on the two dense streams."""
    from sts import extract as ex
    from sts.data import load_dataset
    from sts.models import HookPoint, load_model
    from sts.saes import load_sae

    out = tmp_path / "paper.safetensors"
    assert _run(["extract", "--model", str(model_dirs["qwen2"]), "--sae", str(sae_dirs["topk"]),
                 "--data", str(qa_file), "--shift", "paper", "--max-tokens", "60", "--out", str(out)]) == 0
    got = ex.Stats.load(out)
    lm = load_model(str(model_dirs["qwen2"]))
    engine = ex.Extractor(lm, load_sae(str(sae_dirs["topk"])), HookPoint(2))
    examples = load_dataset(str(qa_file)).examples
    render = ex.Render(chat=False, with_response=True, tokens="all")
    base = engine.dense(ex.sequences(examples, lm.tokenizer, render))
    shifted = engine.dense(ex.icl_sequences(examples, lm.tokenizer, render, 2, 0))
    assert got.a.count == 60
    torch.testing.assert_close(got.sum_sq_diff, ((shifted[:60].double() - base[:60].double()) ** 2).sum(0),
                               rtol=1e-5, atol=1e-6)
