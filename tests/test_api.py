"""The Python API: the README's notebook session on a tiny model, and the SAE/model pairing
warning."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from sts.engine.saes import check_pairing, load_sae

from .conftest import make_sae


def test_the_readme_session_with_loaded_objects_matches_the_cli(tmp_path, run_cli, model_dirs, sae_dirs, held_objects,
                                                                  qa_file, domain_file, monkeypatch):
    """The README's session (objects the user already holds: a transformers model and
    tokenizer, a sae_lens SAE) gives the numbers `sts predict` gives from their names."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    from sts import PredictConfig, predict  # the stages are exported by the package

    pred = predict(PredictConfig(train=str(qa_file), domains=str(domain_file), score="act", k=8), **held_objects)
    ranking = pred.ranking()
    assert [r[0] for r in ranking] == [1, 2, 3] and len(pred.features) == 8
    assert pred.features[0].shift >= pred.features[-1].shift and pred.features[0].contexts
    assert not (tmp_path / "cache").exists()  # objects in memory are not cached

    run_cli(["predict", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
             "--domains", str(domain_file), "--k", "8", "--score", "act", "--out", str(tmp_path / "out")])
    cli = json.loads((tmp_path / "out" / "sts.json").read_text())
    assert {r["domain"]: r["sts"] for r in cli["ranking"]} == pytest.approx(pred.scores, rel=1e-5)
    assert [f["index"] for f in cli["features"]] == [f.index for f in pred.features]


def test_model_and_tokenizer_come_together(model_dirs):
    from sts import predict
    from sts.errors import UserError

    with pytest.raises(UserError, match="together"):
        predict(model=AutoModelForCausalLM.from_pretrained(model_dirs["llama"]))


def test_an_sae_trained_on_another_model_is_warned_about(tmp_path, capsys):
    sae = make_sae("topk")
    sae.cfg.metadata.model_name = "gemma-2-9b-it"
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(str(tmp_path / "sae"))
    check_pairing(loaded, "google/gemma-2-9b-it")  # the same model, named as on the hub
    check_pairing(loaded, "/models/gemma-2-9b-it-q4_k_m.gguf")  # a quantized file of it
    assert capsys.readouterr().err == ""
    check_pairing(loaded, "meta-llama/Meta-Llama-3-8B-Instruct")
    err = capsys.readouterr().err
    assert "gemma-2-9b-it" in err and "Meta-Llama-3-8B-Instruct" in err and err.count("\n") == 1


def test_every_name_the_package_exports_resolves():
    """`sts.NAME` for every exported name (the lazy table follows the modules when they move)."""
    import sts

    missing = [n for n in sts.__all__ if n != "__version__" and getattr(sts, n, None) is None]
    assert missing == []
