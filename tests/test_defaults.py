"""One source for every default and rule: each verb's options default to what its config
does, an option that a combination ignores is refused, and a score is one registry entry."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import pytest
import typer

from sts.analysis.correlate import CorrelateConfig
from sts.cli import app
from sts.engine.settings import (
    EvaluateConfig,
    ExtractConfig,
    FinetuneConfig,
    FinetuneSpec,
    Generation,
    Placement,
    SAETrainSpec,
    TrainSAEConfig,
)
from sts.errors import UserError
from sts.prediction.config import PredictConfig
from sts.prediction.predict import predict_one
from sts.prediction.select import SelectConfig
from sts.scores.settings import ScoreConfig
from sts.validation.config import ValidateConfig

# verb -> its config and the configs nested in it (an option may set a field of either)
CONFIGS: dict[str, tuple[type, ...]] = {
    "extract": (ExtractConfig, Placement, Generation),
    "score": (ScoreConfig,),
    "predict": (PredictConfig, Placement, Generation, FinetuneSpec),
    "train-sae": (TrainSAEConfig, SAETrainSpec, Placement),
    "finetune": (FinetuneConfig, FinetuneSpec, Placement),
    "evaluate": (EvaluateConfig, Placement),
    "correlate": (CorrelateConfig,),
    "validate": (ValidateConfig, FinetuneSpec, Placement),
    "select": (SelectConfig, FinetuneSpec, Placement),
    "scores": (),  # lists the registry; no options
}
# options whose config field has another name (or lives in a nested config of the same field names)
RENAMED: dict[tuple[str, str], tuple[type, str]] = {
    ("train-sae", "train_batch"): (SAETrainSpec, "batch_size"),
    ("train-sae", "dead_window"): (SAETrainSpec, "dead_window_tokens"),
    ("validate", "ft_batch_size"): (FinetuneSpec, "batch_size"),
    ("validate", "ft_max_length"): (FinetuneSpec, "max_length")}
# options with no field of their own, and why
NO_FIELD = {
    ("correlate", "sts"),  # required
    ("predict", "out"),  # where the CLI writes the report; `predict()` returns the Prediction
}
# train-sae's --batch-size is TrainSAEConfig's (caching), not SAETrainSpec's (training)
FIRST_ONLY = {("train-sae", "batch_size")}


def field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"{cls.__name__}.{name} has no default"
    return f.default_factory()


def norm(value: Any) -> Any:
    """What a default means: an enum is its value, a path its string; None, "" and [] all mean
    "not given / the config's own default" for the optional strings and lists of options."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if value in (None, "", [], ()):
        return None
    return value


def options() -> list[tuple[str, Any]]:
    group = typer.main.get_command(app)
    return [(verb, param) for verb, cmd in group.commands.items() for param in cmd.params]


def test_every_verb_has_a_config():
    assert set(typer.main.get_command(app).commands) == set(CONFIGS)


@pytest.mark.parametrize("verb, param", options(), ids=lambda x: x if isinstance(x, str) else x.name)
def test_an_options_default_is_its_config_fields_default(verb, param):
    """The default-parity check: `sts VERB` and `VerbConfig()` run the same thing."""
    if param.required or (verb, param.name) in NO_FIELD:
        return
    classes, name = CONFIGS[verb], param.name
    if (verb, param.name) in RENAMED:
        cls, name = RENAMED[(verb, param.name)]
        classes = (cls,)
    elif (verb, param.name) in FIRST_ONLY:
        classes = classes[:1]
    owners = [c for c in classes if name in {f.name for f in dataclasses.fields(c)}]
    assert owners, f"sts {verb} --{param.name} sets no field of {[c.__name__ for c in classes]}"
    want = field_default(owners[0], name)
    got = param.default
    if (verb, name) in (("predict", "train"), ("finetune", "train")):  # a repeatable option: one set is the list of one
        want = [want]
    assert norm(got) == norm(want), \
        f"sts {verb} --{param.name} defaults to {got!r}, {owners[0].__name__}.{name} to {want!r}"


def test_validate_from_python_runs_the_command_lines_experiment():
    from sts.defaults import DEFAULT_K, DEFAULT_SCORE

    cfg = ValidateConfig()
    assert (cfg.k, cfg.score) == (DEFAULT_K, DEFAULT_SCORE) and PredictConfig().k == DEFAULT_K


def test_predict_chooses_its_score_by_what_the_domain_records_hold():
    """No --score: grad where every domain record holds a reference chain of thought (the embedded
    reference domains' seals count), the plain-question form (act) where one does not."""
    from sts import defaults
    from sts.data.datasets import load_dataset
    from sts.data.examples import Example, seal
    from sts.defaults import DEFAULT_SCORE
    from sts.prediction.config import score_for

    ref = Example("Q?\nA. x\nB. y", "so (A)", "law", "1", choices=("x", "y"), answer="A", cot="so (A)")
    plain = Example("Q2?\nA. x\nB. y", "The answer is (A) x", "law", "2", choices=("x", "y"), answer="A")
    assert PredictConfig().score == ""
    assert score_for({"law": [ref]}) == DEFAULT_SCORE == score_for({"law": [seal(plain, 3)]})
    assert score_for({"law": [ref], "math": [plain]}) == defaults.PLAIN_SCORE == "act"
    assert score_for(load_dataset(defaults.PREDICT_DOMAINS).by_domain()) == DEFAULT_SCORE


def test_lora_alpha_follows_the_rank_from_python_as_from_the_cli():
    assert FinetuneSpec().lora_alpha == 32 and FinetuneSpec(lora_r=8).lora_alpha == 16
    assert FinetuneSpec(lora_r=8, lora_alpha=4).lora_alpha == 4


def test_one_name_and_one_polarity_for_the_first_token():
    for cls in (ExtractConfig, PredictConfig, ValidateConfig):
        assert "first_token" in {f.name for f in dataclasses.fields(cls)}
        assert "skip_first" not in {f.name for f in dataclasses.fields(cls)}
    from sts.data.inputs import domain_render

    assert domain_render(True).skip_first is False and domain_render(False).skip_first is True


@pytest.mark.parametrize("build, needle", [
    (lambda: ExtractConfig("d", "o.safetensors", "m", "s", responses="generated"), "--responses generated"),
    (lambda: ExtractConfig("d", "o.safetensors", "m", "s", shift="icl", responses="generated",
                           with_response=False), "--responses generated"),
    (lambda: ExtractConfig("d", "o.safetensors", "m", "s", tuned_model="t"), "--tuned-model"),
    (lambda: ExtractConfig("d", "o.safetensors", "m", "s", shift="sft", tuned_model="t", demos=3), "--demos"),
    (lambda: ExtractConfig("d", "o.safetensors", "m", "s", shift="icl", domain_demos_n=3), "--domain-demos-n"),
    (lambda: ExtractConfig("d", "o.safetensors", "m", "s", generation=Generation(temperature=0.0)), "--temperature"),
    (lambda: PredictConfig(tuned_model="t"), "--tuned-model"),
    (lambda: predict_one(PredictConfig(score="act", domain_demos="x")), "--domain-demos"),
    (lambda: predict_one(PredictConfig(score="cosine", k=50, explain=False)), "--k"),
    (lambda: predict_one(PredictConfig(method="sft", tuned_model="t", demos=3)), "--demos"),
    (lambda: PredictConfig(generation=Generation(max_new_tokens=8)), "--max-new-tokens"),
    (lambda: ScoreConfig("o.json", {"a": "a.safetensors"}, score="act", shift_stats=Path("s"), train="t"), "--train"),
    (lambda: ScoreConfig("o.json", {"a": "a.safetensors"}, score="lexical", train="t", k=5), "--k"),
    (lambda: ScoreConfig("o.json", {"a": "a.safetensors"}, score="lexical", train="t", max_tokens=5),
     "--max-tokens"),
    (lambda: EvaluateConfig("o", max_new_tokens=64), "--mode cot"),
    (lambda: EvaluateConfig("o", mode="reference", shots=2), "--shots"),
    (lambda: FinetuneSpec(lora=False, lora_r=8), "--lora-r"),
    (lambda: SAETrainSpec(architecture="jumprelu", k=32), "--k and --dead-window"),
    (lambda: CorrelateConfig(Path("s.json"), base=Path("b"), tuned=Path("t"), questions="q"), "--questions"),
    (lambda: ValidateConfig(reference_examples=50), "--reference-examples"),
])
def test_an_option_that_would_change_nothing_is_refused(build, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        build()


def test_the_cli_refuses_an_ignored_option_in_one_line(cli_fails, tmp_path):
    out = tmp_path / "o.safetensors"
    cli_fails(["extract", "--data", "d", "--out", str(out), "--model", "m", "--sae", "s",
               "--responses", "generated"], "--responses generated", out=out)
