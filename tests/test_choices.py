"""Named choices and per-stage configs: one rule, one place, the same for the CLI and the library."""

from __future__ import annotations

import importlib
import json

import pytest

from sts.choices import Method, Score, parse
from sts.errors import UserError


def test_choices_are_their_strings_and_parse_lists_the_valid_values():
    assert Score.RAW_ACT == "raw-act" and json.dumps({"score": Score.ACT}) == '{"score": "act"}'
    assert parse(Method, "sft", "--method") is Method.SFT
    with pytest.raises(UserError, match="unknown --method 'sf'; use one of icl, sft, paper"):
        parse(Method, "sf", "--method")


def _mod(name: str):
    return importlib.import_module(name)


@pytest.mark.parametrize("build, needle", [
    (lambda: _mod("sts.prediction.config").PredictConfig(method="sft"), "--method sft needs --tuned-model"),
    (lambda: _mod("sts.prediction.config").PredictConfig(score="nope"), "unknown --score 'nope'"),
    (lambda: _mod("sts.prediction.config").PredictConfig(k=0), "--k must be at least 1"),
    (lambda: _mod("sts.engine.extract_stage").ExtractConfig("d", "o.pt", "m", "s", shift="icl"),
     "--format pt writes one run's dense features"),
    (lambda: _mod("sts.engine.extract_stage").ExtractConfig("d", "o.safetensors", "m", "s", readout="raw",
                                                              shift="icl", domain_demos="x"), "SAE features"),
    (lambda: _mod("sts.scores.files").ScoreConfig("o.json", {"law": "d.pt"}), "give --base and --shifted"),
    (lambda: _mod("sts.validation.config").ValidateConfig(train=["a", "a"]), "given twice"),
    (lambda: _mod("sts.engine.evaluation").EvaluateConfig("o", shots=-1), "--shots must be 0 or more"),
    (lambda: _mod("sts.analysis.correlate").CorrelateConfig("s.json"), "give --base and --tuned"),
    (lambda: _mod("sts.engine.finetuning").FinetuneSpec(max_length=4), "--max-length must be at least 8"),
    (lambda: _mod("sts.engine.generate").Generation(temperature=-1.0), "--temperature must be 0 or more"),
])
def test_a_config_refuses_a_bad_combination_when_built(build, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        build()


def test_the_cli_reports_the_configs_rule_in_one_line(run_cli, tmp_path):
    from .conftest import assert_bad_input

    out = tmp_path / "out"
    result = run_cli(["predict", "--method", "sft", "--out", out], expect=None)
    assert_bad_input(result, "--method sft needs --tuned-model", out=out)
