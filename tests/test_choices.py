"""Named choices and per-stage configs: one rule, one place, the same for the CLI and the library."""

from __future__ import annotations

import json

import pytest

from sts.choices import Method, Score, parse
from sts.errors import UserError


def test_choices_are_their_strings_and_parse_lists_the_valid_values():
    assert Score.RAW_ACT == "raw-act" and json.dumps({"score": Score.ACT}) == '{"score": "act"}'
    assert parse(Method, "sft", "--method") is Method.SFT
    with pytest.raises(UserError, match="unknown --method 'sf'; use one of icl, sft, paper"):
        parse(Method, "sf", "--method")


@pytest.mark.parametrize("build, needle", [
    (lambda: __import__("sts.prediction").prediction.PredictConfig(method="sft"), "--method sft needs --tuned-model"),
    (lambda: __import__("sts.prediction").prediction.PredictConfig(score="nope"), "unknown --score 'nope'"),
    (lambda: __import__("sts.prediction").prediction.PredictConfig(k=0), "--k must be at least 1"),
    (lambda: __import__("sts.extract").extract.ExtractConfig("d", "o.pt", "m", "s", shift="icl"),
     "--format pt writes one run's dense features"),
    (lambda: __import__("sts.extract").extract.ExtractConfig("d", "o.safetensors", "m", "s", readout="raw",
                                                              shift="icl", domain_demos="x"), "SAE features"),
    (lambda: __import__("sts.score").score.ScoreConfig("o.json", {"law": "d.pt"}), "give --base and --shifted"),
    (lambda: __import__("sts.validation").validation.ValidateConfig(train=["a", "a"]), "given twice"),
    (lambda: __import__("sts.evaluation").evaluation.EvaluateConfig("o", shots=-1), "--shots must be 0 or more"),
    (lambda: __import__("sts.correlation").correlation.CorrelateConfig("s.json"), "give --base and --tuned"),
    (lambda: __import__("sts.finetuning").finetuning.FinetuneSpec(max_length=4), "--max-length must be at least 8"),
    (lambda: __import__("sts.generate").generate.Generation(temperature=-1.0), "--temperature must be 0 or more"),
])
def test_a_config_refuses_a_bad_combination_when_built(build, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        build()


def test_the_cli_reports_the_configs_rule_in_one_line(run_cli, tmp_path):
    from .conftest import assert_bad_input

    out = tmp_path / "out"
    result = run_cli(["predict", "--method", "sft", "--out", out], expect=None)
    assert_bad_input(result, "--method sft needs --tuned-model", out=out)
