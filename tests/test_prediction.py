"""`sts predict` end to end on tiny models and its cache; the paper's domain scores (STS_act,
STS_ICL) and the baselines, each against a direct dense computation of its formula: hidden
states from a plain HF forward pass, features from sae_lens's own `encode`, sums in numpy."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from sae_lens import SAE

from sts.data.datasets import load_dataset
from sts.data.examples import Example
from sts.defaults import DEFAULT_K
from sts.engine.models import load_model
from sts.errors import UserError
from sts.prediction.config import PredictConfig
from sts.prediction.extraction import extract_all
from sts.prediction.predict import predict_one, prediction
from sts.scores.score import uses_domain_demos

from .conftest import DOMAINS, QUESTIONS, SHARED, needs_shared


@pytest.fixture
def predict_args(tmp_path, model_dirs, sae_dirs, qa_file, domain_file, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    return ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
            "--domains", str(domain_file), "--k", "8", "--out", str(tmp_path / "out")]


def test_predict_writes_ranking_json_csv_png_and_features(tmp_path, run_cli, predict_args):
    captured = run_cli(["predict", *predict_args])
    out = tmp_path / "out"
    result = json.loads((out / "sts.json").read_text())
    ranking = result["ranking"]
    assert [r["domain"] for r in ranking] and {r["domain"] for r in ranking} == set(QUESTIONS)
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert [r["sts"] for r in ranking] == sorted((r["sts"] for r in ranking), reverse=True)
    assert all(r["tokens"] > 0 and r["questions"] == 3 for r in ranking)
    assert len(result["shifted_features"]) == 8 and len(result["features"]) == 8
    shifts = [f["shift"] for f in result["features"]]
    assert shifts == sorted(shifts, reverse=True) and shifts[0] > 0
    assert any(f["contexts"] and "[[" in f["contexts"][0]["context"] for f in result["features"])
    rows = list(csv.DictReader((out / "sts.csv").open()))
    assert [r["domain"] for r in rows] == [r["domain"] for r in ranking]
    assert (out / "sts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ranking[0]["domain"] in captured.out and "shifted features" in captured.out


def test_rel_act_works_with_the_paper_shift(tmp_path, run_cli, predict_args):
    """rel-act (the default before the held-out round) on `--method paper`'s index-aligned shift,
    not only on icl."""
    run_cli(["predict", *predict_args, "--method", "paper", "--score", "rel-act"])
    result = json.loads((tmp_path / "out" / "sts.json").read_text())
    assert result["score"] == "rel-act" and len(result["shifted_features"]) == 8
    values = [r["sts"] for r in result["ranking"]]
    assert all(np.isfinite(values)) and max(values) > 0
    assert 0 < result["features"][0]["shift"] <= 1  # a share of the feature's own energy


def test_second_run_reuses_cache_and_any_change_invalidates_it(tmp_path, run_cli, predict_args):
    # grad, as on reference domains (these plain questions would get act by default): its gradient
    # sides are cached apart from the SAE shift that explains it
    predict_args = [*predict_args, "--score", "grad"]
    cold = run_cli(["predict", *predict_args])
    plan = next(line for line in cold.err.splitlines() if "to compute:" in line)  # said before any model pass
    # grad: the gradients of the examples and of each domain, and the SAE shift that explains them
    assert f"the gradients of 3 of {len(QUESTIONS)} domains" in plan and "the gradients of 5 examples" in plan
    assert "the shift of 5 examples" in plan and "min on" in plan
    assert cold.err.index("to compute:") < cold.err.index("loading")
    entries = sorted((tmp_path / "cache" / "extract").glob("*.safetensors"))
    # the shift, the training gradients and each domain's gradient side, these two exact and sketched
    assert len(entries) == 1 + 2 + 2 * len(QUESTIONS)
    first = json.loads((tmp_path / "out" / "sts.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in entries}
    warm = run_cli(["predict", *predict_args])
    assert {p: p.stat().st_mtime_ns for p in entries} == mtimes  # nothing recomputed
    # the shift, the top contexts, the sketched training gradients and the 3 sketched domain sides
    assert "no model pass" in warm.err and "reused 6 cached entries" in warm.err
    assert json.loads((tmp_path / "out" / "sts.json").read_text())["scores"] == first["scores"]
    run_cli(["predict", *predict_args, "--demos", "1"])  # new demonstrations: a new shift entry
    assert len(list((tmp_path / "cache" / "extract").glob("*.safetensors"))) == len(entries) + 1


def test_corrupted_cache_entry_is_recomputed(tmp_path, run_cli, predict_args):
    run_cli(["predict", *predict_args])
    first = json.loads((tmp_path / "out" / "sts.json").read_text())
    victim = sorted((tmp_path / "cache" / "extract").glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the tensor data: still loads, but must not be trusted
    victim.write_bytes(bytes(data))
    captured = run_cli(["predict", *predict_args])
    assert "corrupted" in captured.err
    assert json.loads((tmp_path / "out" / "sts.json").read_text())["scores"] == first["scores"]


def test_predict_bad_k_fails_cleanly(tmp_path, cli_fails, predict_args):
    line = cli_fails(["predict", *predict_args, "--score", "act", "--k", "100000"], out=tmp_path / "out")
    assert line.startswith("sts: error: k must be between 1")


@needs_shared
def test_predict_on_shared_mmlu_pro_and_math500(tmp_path, run_cli, model_dirs, sae_dirs, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    data = SHARED / "data"
    run_cli(["predict", "--model", str(model_dirs["qwen2"]), "--sae", str(sae_dirs["jumprelu"]),
             "--train", str(data / "math500_test.jsonl"), "--domains", str(data / "mmlu_pro_test.jsonl"),
             "--max-train", "4", "--max-examples", "1", "--max-length", "2048", "--k", "5", "--score", "act",
             "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "sts.json").read_text())
    assert len(result["ranking"]) == 14 and all(r["questions"] == 1 for r in result["ranking"])
    assert result["score"] == "act" and result["truncation"]["train"]["cut"] == 0
    # STS_ICL with MMLU-Pro's chain-of-thought demonstrations of each category
    run_cli(["predict", "--model", str(model_dirs["qwen2"]), "--sae", str(sae_dirs["jumprelu"]),
             "--train", str(data / "math500_test.jsonl"), "--domains", str(data / "mmlu_pro_test.jsonl"),
             "--max-train", "4", "--max-examples", "1", "--max-length", "2048", "--k", "5",
             "--score", "icl", "--domain-demos", str(data / "mmlu_pro_cot_demos.jsonl"),
             "--domain-demos-n", "1", "--out", str(tmp_path / "icl")])
    icl = json.loads((tmp_path / "icl" / "sts.json").read_text())
    assert icl["score"] == "icl" and len(icl["ranking"]) == 14 and all(r["sts"] > 0 for r in icl["ranking"])
    assert icl["demonstrations"]["source"].endswith("mmlu_pro_cot_demos.jsonl")
    assert all(len(v) == 1 for v in icl["demonstrations"]["per_domain"].values())


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
    demos = {"domain_demos_n": M} if uses_domain_demos(score) else {}  # predict refuses it where unused
    return PredictConfig(model=model, sae=sae, train="train", domains="d", k=6, score=score,
                         top_contexts=0, use_cache=False, **demos, **kw)


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
    act = predict_one(_cfg(model, sae_dir, "act"), train, _domains())
    icl = predict_one(_cfg(model, sae_dir, "icl"), train, _domains())  # demos: each domain's first M
    assert act.score == "act" and icl.score == "icl"
    S = [f.index for f in act.features]
    assert [f.index for f in icl.features] == S and len(S) == 6  # the same shift, the same S
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
    from sts.data.inputs import Render, icl_pairs

    pairs = list(icl_pairs(train.examples, tok, Render(chat=True, tokens="response"), 2, 0, 512))
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


def test_scale_free_scores_equal_direct_dense_computation(setup, qa_file):
    """rel-act and rel-icl (docs/results/transfer/ADDENDUM.md), written out on dense features:
    S = top k of sum (f_b - f_a)^2 / (sum f_a^2 + f_b^2 + 1e-3 mean_j sum f_a^2) over the
    training pairs' aligned tokens; each domain's per-feature value over the domains' mean."""
    from sts.data.inputs import Render, icl_pairs

    lm, sae, model, sae_dir = setup
    tok = lm.tokenizer
    train = load_dataset(str(qa_file))
    got = {s: predict_one(_cfg(model, sae_dir, s), train, _domains()) for s in ("act", "rel-act", "rel-icl")}
    ssd = energy_a = energy_b = 0.0
    for p in icl_pairs(train.examples, tok, Render(chat=True, tokens="response"), 2, 0, 1024):
        f_a = _features(sae, _hidden(lm, p.a.ids))[p.a.positions]
        f_b = _features(sae, _hidden(lm, p.b.ids))[p.b.positions]
        ssd = ssd + ((f_b - f_a) ** 2).sum(0)
        energy_a, energy_b = energy_a + (f_a ** 2).sum(0), energy_b + (f_b ** 2).sum(0)
    rel = ssd / (energy_a + energy_b + 1e-3 * energy_a.mean())
    top = np.argsort(-rel, kind="stable")[:6]
    assert [f.index for f in got["rel-act"].features] == [f.index for f in got["rel-icl"].features] == top.tolist()
    assert [f.index for f in got["act"].features] == np.argsort(-ssd, kind="stable")[:6].tolist()
    act, icl = {}, {}
    for domain, questions in DOMAINS.items():
        act[domain] = np.concatenate([_features(sae, _hidden(lm, tok(q)["input_ids"]))[1:] for q in questions]).mean(0)
        prefix = "\n\n".join(f"{d.prompt}\n{d.response}" for d in _domains()[domain][:M]) + "\n\n"
        diffs = []
        for q in questions[M:]:
            ids_a, ids_b = tok(q)["input_ids"], tok(prefix + q)["input_ids"]
            n = len(ids_a) - 1
            diffs.append((_features(sae, _hidden(lm, ids_b))[-n:] - _features(sae, _hidden(lm, ids_a))[1:]) ** 2)
        icl[domain] = np.concatenate(diffs).mean(0)
    for name, values in (("rel-act", act), ("rel-icl", icl)):
        mean = np.mean([values[d] for d in DOMAINS], 0)
        for domain in DOMAINS:
            u = np.where(mean != 0, values[domain] / np.where(mean != 0, mean, 1), 0)
            assert got[name].scores[domain] == pytest.approx(u[top].sum(), rel=1e-4)
    assert got["rel-icl"].demonstrations["source"] == "first questions"
    assert got["rel-icl"].samples is not None and got["rel-icl"].samples.scale is not None
    assert got["rel-icl"].samples.scores() == pytest.approx(got["rel-icl"].scores, rel=1e-6)  # the bootstrap's base


def test_a_score_over_no_features_is_explained_by_the_sae_shift(setup, qa_file):
    """cosine and lexical read no shifted features; predict still reads the training set's SAE
    shift and reports its top k (STS_act's S, written out on dense features) as the explanation
    of the ranking, the scores unchanged; with explain off there is no SAE pass at all."""
    from sts.data.inputs import Render, icl_pairs
    from sts.prediction import report

    lm, sae, model, sae_dir = setup
    train = load_dataset(str(qa_file))

    def by_hand(examples):
        ssd = 0.0
        for p in icl_pairs(examples, lm.tokenizer, Render(chat=True, tokens="response"), 2, 0, 1024):
            f_a = _features(sae, _hidden(lm, p.a.ids))[p.a.positions]
            f_b = _features(sae, _hidden(lm, p.b.ids))[p.b.positions]
            ssd = ssd + ((f_b - f_a) ** 2).sum(0)
        return ssd, np.argsort(-ssd, kind="stable")[:6]

    ssd, top = by_hand(train.examples)
    # --explain-examples N: the explanation is the first N examples' shift, the ranking unchanged
    part, part_top = by_hand(train.examples[:4])
    assert part_top.tolist() != top.tolist() or part[part_top].tolist() != pytest.approx(ssd[top].tolist())
    whole = predict_one(_cfg(model, sae_dir, "lexical", explain_examples=0), train, _domains())
    first = predict_one(_cfg(model, sae_dir, "lexical", explain_examples=4), train, _domains())
    assert [f.index for f in first.features] == part_top.tolist()
    assert [f.shift for f in first.features] == pytest.approx(part[part_top].tolist(), rel=1e-4)
    assert first.scores == pytest.approx(whole.scores, rel=1e-9)
    assert "its first 4 examples" in report.features_text(first)
    for score in ("cosine", "lexical"):
        pred = predict_one(_cfg(model, sae_dir, score), train, _domains())
        assert [f.index for f in pred.features] == top.tolist()
        assert [f.shift for f in pred.features] == pytest.approx(ssd[top].tolist(), rel=1e-4)
        assert "an explanation" in report.features_text(pred)
        bare_cfg = dataclasses.replace(_cfg(model, sae_dir, score), explain=False, k=DEFAULT_K)  # k: unused
        bare = predict_one(bare_cfg, train, _domains())
        assert bare.features == [] and bare.scores == pytest.approx(pred.scores, rel=1e-9)
    assert extract_all(dataclasses.replace(bare_cfg, score="lexical"), train, _domains(), ("lexical",)).shift == {}
    with pytest.raises(UserError, match="--no-explain"):
        predict_one(_cfg(model, sae_dir, "act", explain=False), train, _domains())
    # a set too small for the explanation's icl pairs (2 demonstrations need 3 examples): the
    # ranking stands, the missing explanation is said
    said: list[str] = []
    small = dataclasses.replace(train, examples=train.examples[:2])
    got = predict_one(_cfg(model, sae_dir, "lexical"), small, _domains(), progress=said.append)
    assert got.features == [] and any("no SAE explanation" in m and "--demos" in m for m in said)


def test_the_data_shift_equals_per_example_means_computed_by_hand(setup, qa_file):
    """--method data: each training response's mean features (teacher-forced) against the mean
    over the model's own response to the same prompt; sums over examples, by hand."""
    from sts.data.inputs import sequences, training_render
    from sts.engine import extract as ex
    from sts.engine.models import parse_hook_name
    from sts.engine.saes import load_sae

    lm, sae, model, sae_dir = setup
    data = load_dataset(str(qa_file)).examples
    own = [Example(e.prompt, f"My own answer {i} is different.", e.domain, e.uid) for i, e in enumerate(data)]
    loaded = load_sae(sae_dir)
    engine = ex.Extractor(lm, loaded, parse_hook_name(loaded.hook_name), batch_tokens=64)
    got = ex.data_shift_stats(engine, own, data, training_render("data"), 256, ("sae", "raw"))["sae"]

    def means(examples):
        out = []
        for seq in sequences(examples, lm.tokenizer, training_render("data"), 256):
            f = _features(sae, _hidden(lm, seq.ids))[seq.positions]
            out.append(f.mean(0))
        return np.stack(out)

    a, b = means(own), means(data)
    assert got.a.count == got.b.count == len(data)
    assert got.a.sum.numpy() == pytest.approx(a.sum(0), abs=1e-4)
    assert got.b.sum_sq.numpy() == pytest.approx((b ** 2).sum(0), abs=1e-4)
    assert got.sum_sq_diff.numpy() == pytest.approx(((b - a) ** 2).sum(0), abs=1e-4)
    per = got.example_shift(list(range(got.a.d_sae))).numpy()
    assert per == pytest.approx((b - a) ** 2, abs=1e-4)


def test_predict_with_the_data_shift_generates_once_and_scores(run_cli, tmp_path, model_dirs, sae_dirs, qa_file,
                                                               domain_file, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    argv = ["predict", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
            "--domains", str(domain_file), "--method", "data", "--max-new-tokens", "6", "--k", "8",
            "--score", "raw-act", "--out", str(tmp_path / "out")]
    first = run_cli(argv)
    assert "generating responses to 5 training prompts" in first.err
    result = json.loads((tmp_path / "out" / "sts.json").read_text())
    assert result["config"]["method"] == "data" and len(result["ranking"]) == 3
    again = run_cli(argv[:-4] + ["--score", "act", "--out", str(tmp_path / "out2")])
    assert "generating" not in again.err  # the model's own responses are cached
    from .conftest import assert_bad_input

    assert_bad_input(run_cli(argv + ["--responses", "generated"], expect=None), "--method data")


def test_a_warm_run_never_imports_sae_lens(tmp_path, run_cli, predict_args):
    """With every statistic cached, the SAE's shape and hook come from its cfg.json: sae_lens
    (13 s of imports on 2 cores) is not loaded, and the answer is the cold run's."""
    import subprocess
    import sys

    run_cli(["predict", *predict_args])
    first = json.loads((tmp_path / "out" / "sts.json").read_text())["scores"]
    probe = ("import sys; from sts.cli import main; code = main(sys.argv[1:]); "
             "print('sae_lens imported' if 'sae_lens' in sys.modules else 'sae_lens not imported'); sys.exit(code)")
    warm = subprocess.run([sys.executable, "-c", probe, "predict", *predict_args], capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr
    assert "no model pass" in warm.stderr and "sae_lens not imported" in warm.stdout
    assert json.loads((tmp_path / "out" / "sts.json").read_text())["scores"] == first


def test_an_sae_is_loaded_when_its_weights_are_needed_and_a_bad_one_says_so(tmp_path, sae_dirs):
    import shutil

    from sts.engine.saes import load_sae
    from sts.errors import UserError

    lazy = load_sae(str(sae_dirs["topk"]))
    shape = (lazy.d_in, lazy.d_sae, lazy.hook_name, lazy.model_name)
    assert lazy._sae is None  # read from cfg.json alone
    assert shape == (int(lazy.sae.cfg.d_in), int(lazy.sae.cfg.d_sae), lazy.sae.cfg.metadata.hook_name,
                     lazy.sae.cfg.metadata.model_name)  # what sae_lens reads, once loaded
    assert lazy.encode(torch.zeros(2, lazy.d_in)).shape == (2, lazy.d_sae)
    broken = tmp_path / "broken"
    shutil.copytree(sae_dirs["topk"], broken)
    (broken / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    sae = load_sae(str(broken))
    with pytest.raises(UserError, match="could not be loaded"):
        sae.encode(torch.zeros(1, sae.d_in))
