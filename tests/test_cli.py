"""`sts` on bad input: one line on stderr, exit status 2, no traceback, no output file (the
contract is `conftest.assert_bad_input`, shared with the verbs' own bad-input tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from sts.options import option

from .conftest import HIDDEN, make_sae, write_jsonl


@pytest.fixture
def common(model_dirs, sae_dirs, text_file):
    return {"--model": str(model_dirs["llama"]), "--sae": str(sae_dirs["standard"]),
            "--data": str(text_file)}


def _argv(opts, **changes):
    merged = {**opts, **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
    return ["extract", *[x for kv in merged.items() for x in kv]]


def test_model_not_found(cli_fails, tmp_path, common):
    out = tmp_path / "o.safetensors"
    cli_fails(_argv(common, model=str(tmp_path / "nope"), out=str(out)), "model not found", out=out)
    cli_fails(_argv(common, model=str(tmp_path / "m.gguf"), out=str(out)), "model not found", out=out)


def test_sae_not_found(cli_fails, tmp_path, common):
    out = tmp_path / "o.safetensors"
    cli_fails(_argv(common, sae=str(tmp_path / "nope"), out=str(out)), "SAE not found", out=out)
    cli_fails(_argv(common, sae="no-such-release/layer_3", out=str(out)), "no-such-release", out=out)
    cli_fails(_argv(common, sae="gemma-scope-2b-pt-res/layer_99/none", out=str(out)), "has no SAE", out=out)


def test_sae_width_differs_from_hidden_size(cli_fails, tmp_path, common):
    wrong = tmp_path / "wrong_sae"
    make_sae("standard", d_in=HIDDEN + 8).save_model(wrong)
    out = tmp_path / "o.safetensors"
    cli_fails(_argv(common, sae=str(wrong), out=str(out)), str(HIDDEN + 8), str(HIDDEN), out=out)


def test_layer_out_of_range(cli_fails, tmp_path, common):
    out = tmp_path / "o.safetensors"
    cli_fails(_argv(common, layer="9", out=str(out)), "layer 9 is out of range", out=out)
    far = tmp_path / "far_sae"
    make_sae("standard", hook="blocks.12.hook_resid_post").save_model(far)
    cli_fails(_argv(common, sae=str(far), out=str(out)), "layer 12 is out of range", out=out)


def test_dataset_path_missing(cli_fails, tmp_path, common):
    out = tmp_path / "o.safetensors"
    cli_fails(_argv(common, data=str(tmp_path / "missing.jsonl"), out=str(out)), "dataset not found", out=out)


def test_no_usable_fields_names_fields_and_schemas(cli_fails, tmp_path, common):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": "x"}])
    out = tmp_path / "o.safetensors"
    line = cli_fails(_argv(common, data=str(data), out=str(out)), "no usable fields", out=out)
    assert "foo, bar" in line and "mmlu_pro" in line and "text" in line


def test_malformed_jsonl_line_names_the_line(cli_fails, run_cli, tmp_path, common):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n" + json.dumps({"text": "ok"}) + "\n")
    out = tmp_path / "o.safetensors"
    cli_fails(_argv(common, data=str(data), out=str(out)), "line 2", "--skip-bad-lines", out=out)
    # with the flag: skipped with a warning that names the line, and the run succeeds
    result = run_cli(_argv(common, data=str(data), out=str(out)) + ["--skip-bad-lines"])
    assert "skipped 1 malformed line(s): 2" in result.err
    assert out.exists()


def test_empty_domain(cli_fails, tmp_path, common):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "o.safetensors"
    cli_fails(_argv(common, data=str(empty), out=str(out)), "no records", out=out)
    torch.save(torch.zeros(0, 16), tmp_path / "d.pt")
    torch.save(torch.rand(10, 16), tmp_path / "a.pt")
    scores = tmp_path / "s.json"
    cli_fails(["score", "--base", str(tmp_path / "a.pt"), "--shifted", str(tmp_path / "a.pt"),
               "--domain", f"law={tmp_path / 'd.pt'}", "--out", str(scores)], "no rows", out=scores)


@pytest.mark.parametrize("k, needle", [("0", "'--k': Input should be greater than or equal to 1"),
                                      ("17", "k must be between 1 and the SAE width 16")])
def test_k_out_of_range(cli_fails, tmp_path, k, needle):
    for name in ("a", "b", "d"):
        torch.save(torch.rand(10, 16), tmp_path / f"{name}.pt")
    scores = tmp_path / "s.json"
    cli_fails(["score", "--base", str(tmp_path / "a.pt"), "--shifted", str(tmp_path / "b.pt"),
               "--domain", f"x={tmp_path / 'd.pt'}", "--k", k, "--out", str(scores)], needle, out=scores)


def test_pt_tensors_of_different_widths(cli_fails, tmp_path):
    torch.save(torch.rand(10, 16), tmp_path / "a.pt")
    torch.save(torch.rand(10, 24), tmp_path / "b.pt")
    scores = tmp_path / "s.json"
    cli_fails(["score", "--base", str(tmp_path / "a.pt"), "--shifted", str(tmp_path / "b.pt"),
               "--domain", f"x={tmp_path / 'a.pt'}", "--out", str(scores)], "different widths", out=scores)
    cli_fails(["score", "--base", str(tmp_path / "a.pt"), "--shifted", str(tmp_path / "a.pt"),
               "--domain", f"x={tmp_path / 'b.pt'}", "--out", str(scores)], "24 features", out=scores)


def test_console_script_reports_one_line(tmp_path):
    """The installed `sts` script itself (beside this interpreter, as `pip install` puts it):
    exit 2, a single stderr line, no traceback."""
    from pathlib import Path

    script = Path(sys.executable).parent / "sts"
    assert script.is_file(), f"no installed sts script beside {sys.executable}; run make setup"
    proc = subprocess.run([str(script), "score", "--base", str(tmp_path / "x.pt"),
                           "--shifted", str(tmp_path / "x.pt"), "--domain", "a=b.pt",
                           "--out", str(tmp_path / "s.json")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"sts: error: feature file not found: {tmp_path / 'x.pt'}"]


def test_icl_demonstrations_filling_max_length_exit_2(cli_fails, common, qa_file, tmp_path):
    out = tmp_path / "shift.safetensors"
    opts = {**common, "--data": str(qa_file)}
    cli_fails(_argv(opts, shift="icl", max_length="12", out=str(out)),
              "no training example keeps an aligned token", "raise --max-length", out=out)


@dataclass
class Sub:
    size: int = option(4, min=1, help="a size")
    hidden: int = 9  # no help: not an option
    seed: int = option(0, help="the sub-config's seed")


@dataclass
class Config:
    name: str = option(help="required")
    items: list[str] = option(factory=lambda: ["a"], help="repeatable")
    cache: bool = option(True, flag="--cache/--no-cache", help="a flag of another name")
    sub: Sub = field(default_factory=Sub)
    internal: str = "kept"


def test_a_verbs_options_are_its_config_fields_and_build_the_config():
    """`_verb` makes a field with help (`sts.options.option`) an option, with the field's default,
    flag and bound, flattens a sub-config's option fields (renamed where asked), and hands the body
    the config built from what was given; a field without help stays the library's own."""
    import typer
    from typer.testing import CliRunner

    from sts.cli import _verb

    got: list[Config] = []
    app = typer.Typer()

    @app.command()
    @_verb(Config, {"sub": {"size": "sub_size"}})  # the sub-config's seed is not taken
    def run(cfg: Config) -> None:
        got.append(cfg)

    @app.command()
    def other() -> None:  # a second command keeps typer's group (and the verb's name)
        pass

    runner = CliRunner()
    assert runner.invoke(app, ["run", "--name", "x"]).exit_code == 0
    assert got[-1] == Config(name="x")  # the defaults are the dataclass's
    result = runner.invoke(app, ["run", "--name", "y", "--items", "b", "--items", "c", "--no-cache", "--sub-size", "7"])
    assert result.exit_code == 0, result.output
    assert got[-1] == Config(name="y", items=["b", "c"], cache=False, sub=Sub(size=7))
    assert runner.invoke(app, ["run", "--name", "z", "--sub-size", "0"]).exit_code == 2  # min=1
    assert runner.invoke(app, ["run", "--name", "z", "--hidden", "1"]).exit_code == 2  # no such option
    assert runner.invoke(app, ["run", "--name", "z", "--seed", "1"]).exit_code == 2  # not flattened
    assert runner.invoke(app, ["run"]).exit_code == 2  # --name is required
    assert "a flag of another name" in runner.invoke(app, ["run", "--help"]).output


def test_the_command_line_and_the_library_build_the_same_configs():
    """`sts predict` and `sts validate` with the same options give the same configs as the library
    called with those fields (one list of fields, one rule for --seed)."""
    from sts.cli import PREDICT_OUT, _build
    from sts.engine.settings import FinetuneSpec, Generation
    from sts.prediction.config import PredictConfig
    from sts.validation.config import ValidateConfig

    flat_p = {"placement": None, "generation": None, "finetune": {"gradient_checkpointing": "gradient_checkpointing"}}
    cli = _build(PredictConfig, {"seed": 3, "k": 50, "temperature": 0.5, "gradient_checkpointing": True,
                                 "library": "none", "calibrate": ["none"], "train": ["embedded:champ"],
                                 "method": "data"}, flat_p)
    lib = PredictConfig(seed=3, k=50, generation=Generation(temperature=0.5), method="data",
                        finetune=FinetuneSpec(gradient_checkpointing=True), library="", calibrate=[])
    assert cli == lib and cli.generation.seed == cli.finetune.seed == 3 and PREDICT_OUT.name == "out"
    flat_v = {"placement": None, "finetune": {"lora": "lora", "lr": "lr", "max_steps": "max_steps",
                                              "batch_size": "ft_batch_size", "max_length": "ft_max_length"}}
    cli_v = _build(ValidateConfig, {"seed": 2, "ft_batch_size": 8, "max_steps": 5, "lora": True}, flat_v)
    assert cli_v == ValidateConfig(seed=2, finetune=FinetuneSpec(batch_size=8, max_steps=5))
    assert cli_v.finetune.seed == 2
