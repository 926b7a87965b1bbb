"""The score registry: a score is one registered object (`sts.scores.score.register`) that carries its
kind (what it reads, how it scores), label and formula; `sts predict`, `sts validate`, the CLI's
choices and the reports read it from the registry, and `sts.scores` plugins register theirs."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sts.choices import Readout
from sts.prediction.config import PredictConfig
from sts.prediction.predict import predict_one
from sts.scores import score
from sts.scores.features import mean_activation

from .conftest import assert_bad_input
from .test_validation import CATEGORIES, _domain_file, _reference_file


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test: `register` fills it, the built-in one is left as it was."""
    monkeypatch.setattr(score, "REGISTRY", dict(score.REGISTRY))
    return score.REGISTRY


def _cosines(stats) -> dict[str, float]:
    g = stats.train_mean.double()
    return {d: float(torch.nn.functional.cosine_similarity(g, v.double(), dim=0)) for d, v in stats.domains.items()}


def _grad_cos(seen: list):
    """A new kind of score: the cosine of the training gradient and each domain's (it reads the
    gradient sides, as grad does, and scores them its own way); `seen` keeps what it was given."""
    def compute(spec, extraction, k):
        seen.append(extraction.gradients)
        return score.ScoreOutput(_cosines(extraction.gradients), dict(extraction.gradients.records))

    kind = score.Kind("gradient-cosine", compute, frozenset({"gradients"}), counts="records")
    return score.ScoreSpec("grad-cos", "cos(G, g_D): the training gradient's cosine with D's", None, kind=kind,
                           uses_shift=False, baseline=True, label="cosine of the LoRA gradients")


def test_a_score_added_through_the_registry_runs_end_to_end(tmp_path, held_objects, qa_file, domain_file,
                                                             registry, monkeypatch):
    """A features score is its per-feature domain value and one `register` call: here the share of
    counted tokens on which each feature fires, summed over S, computed by `predict`."""
    from sts.prediction import report

    def firing_rate(st):
        return st.fires.double() / st.count

    spec = score.register(score.ScoreSpec("firing-rate", "sum_{j in S} P(f_j > 0 on D's tokens)", Readout.SAE,
                                          value=firing_rate))
    assert "firing-rate" in score.statistics_scores() and "firing-rate" in score.shift_scores()
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    pred = predict_one(PredictConfig(train=str(qa_file), domains=str(domain_file), score="firing-rate", k=8),
                   **held_objects)
    assert pred.formula == spec.formula and len(pred.features) == 8
    for value in pred.scores.values():
        assert 0 <= value <= 8  # a sum of 8 shares
    act = predict_one(PredictConfig(train=str(qa_file), domains=str(domain_file), score="act", k=8), **held_objects)
    assert [f.index for f in act.features] == [f.index for f in pred.features]  # the same S
    assert pred.scores != act.scores
    report.write(pred, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "sts.json").read_text())["score"] == "firing-rate"


def test_a_new_kind_of_score_runs_in_predict_validate_and_the_cli(tmp_path, run_cli, model_dirs, sae_dirs,
                                                                  registry, monkeypatch):
    """One module's worth: a Kind (what it reads, how it scores) and a `register` call. `sts
    predict --help` offers it, `sts scores` lists its formula, `sts predict` and `sts validate`
    run it as the primary score from the extraction its kind asks for, and `sts score` (files,
    no model) refuses it in one line."""
    seen: list = []
    score.register(_grad_cos(seen))
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    assert "grad-cos" in run_cli(["predict", "--help"]).out.replace("\n", " ").replace("  ", "")
    assert "grad-cos\tgradient-cosine\tgradients\tyes\tcos(G, g_D)" in run_cli(["scores"]).out
    domains = _domain_file(tmp_path)
    reference = _reference_file(tmp_path)
    out = tmp_path / "pred"
    run_cli(["predict", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train",
             f"{reference}#category=math", "--domains", str(reference), "--max-train", "3", "--score", "grad-cos",
             "--no-explain", "--out", str(out)])
    got = json.loads((out / "sts.json").read_text())
    assert got["score"] == "grad-cos" and len(seen) == 1  # scored once, from the gradients it asked for
    want = _cosines(seen[0])
    assert set(got["scores"]) == set(want) == set(CATEGORIES[:4])
    for d, value in want.items():
        assert got["scores"][d] == pytest.approx(value, rel=1e-6) and -1 <= value <= 1

    val = tmp_path / "round"
    run_cli(["validate", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--domains", str(domains),
             "--train", f"{domains}#category=math", "--max-train", "4", "--predict-examples", "5", "--k", "8",
             "--max-steps", "2", "--ft-batch-size", "2", "--replicates", "20", "--reference", str(reference),
             "--reference-examples", "3", "--metric", "cot_nll", "--no-question-evaluation", "--no-sft-shift",
             "--score", "grad-cos", "--out", str(val)])
    tdir = val / "train-1-d-math"
    assert json.loads((tdir / "predict-icl" / "sts.json").read_text())["score"] == "grad-cos"
    written = json.loads((tdir / "scores-icl.json").read_text())["scores"]
    assert {"grad-cos", "grad", "act"} <= set(written)  # the primary beside every score its extraction serves
    res = json.loads((val / "results.json").read_text())
    rows = [r for r in res["per_train"] if r["score"] == "grad-cos"]
    assert rows and all(r["baseline"] for r in rows)
    cells = list(csv.DictReader((val / "matrices" / "score-icl-grad-cos.csv").open()))
    assert float(cells[0]["math"]) == pytest.approx(written["grad-cos"]["math"], rel=1e-5)

    files = tmp_path / "s.json"
    assert_bad_input(run_cli(["score", "--score", "grad-cos", "--domain", f"a={reference}", "--out", str(files)],
                             expect=None), "--score grad-cos reads the model", out=files)


def test_register_refuses_what_would_not_run(registry):
    with pytest.raises(ValueError, match="registered already"):
        score.register(score.ScoreSpec("act", "again", Readout.SAE, value=mean_activation))
    with pytest.raises(ValueError, match="without spaces"):
        score.register(score.ScoreSpec("my score", "f", Readout.SAE, value=mean_activation))
    with pytest.raises(ValueError, match="per-feature domain value"):
        score.register(score.ScoreSpec("no-value", "f", Readout.SAE))
    with pytest.raises(ValueError, match="reads"):
        score.Kind("odd", lambda spec, x, k: score.ScoreOutput({}, {}), frozenset({"weights"}))
    with pytest.raises(ValueError, match="give the readout"):
        score.register(score.ScoreSpec("no-readout", "f", None, value=mean_activation))
    with pytest.raises(ValueError, match="uses_shift=False"):
        score.register(score.ScoreSpec("text-shift", "f", None, kind=score.LEXICAL))
    assert not {"my score", "no-value", "no-readout", "text-shift"} & set(registry)


def test_a_plugin_registers_its_scores_before_the_cli_is_built(tmp_path, run_cli, registry, monkeypatch):
    """A package's `sts.scores` entry point is imported by `sts` before it parses: its scores are
    choices and `sts scores` lists them; a plugin that fails to import ends in one line, exit 2."""
    (tmp_path / "my_scores.py").write_text(
        "from sts.choices import Readout\n"
        "from sts.scores.features import mean_square\nfrom sts.scores.score import ScoreSpec, register\n"
        "register(ScoreSpec('mean-sq-plugin', 'mean_{j in S} mean_t f_j^2, from a plugin', Readout.SAE,\n"
        "                   value=mean_square, reduce='mean'))\n")
    (tmp_path / "broken_scores.py").write_text("raise RuntimeError('needs a setting')\n")
    for name, module in (("my-scores", "my_scores"), ("broken-scores", "broken_scores")):
        info = tmp_path / "good" / f"{name.replace('-', '_')}-0.1.dist-info" if module == "my_scores" else \
            tmp_path / "bad" / f"{name.replace('-', '_')}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[sts.scores]\n{name} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "good"))
    assert "mean-sq-plugin\tfeatures\tstatistics\tno\tmean_{j in S}" in run_cli(["scores"]).out
    assert "mean-sq-plugin" in registry
    monkeypatch.syspath_prepend(str(tmp_path / "bad"))
    assert_bad_input(run_cli(["scores"], expect=None), "the score plugin broken-scores (broken_scores) failed to load")
