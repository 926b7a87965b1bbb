"""Where models run and how batches are laid out: --device/--dtype routing, token-budget
batches whose layout never changes the statistics, and bfloat16 against float32."""

from __future__ import annotations

import pytest
import torch

from sts.data.examples import Example
from sts.data.inputs import Render, domain_icl_pairs, sequences
from sts.engine import extract as ex
from sts.engine.models import HookPoint, load_model
from sts.engine.saes import load_sae
from sts.engine.settings import Placement, resolve_device, resolve_dtype
from sts.errors import UserError

from .conftest import CORPUS
from .tolerance import TINY_FORWARD, assert_same_reduction


def test_auto_resolves_to_the_cpu_and_float32_here_and_names_are_checked():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: auto resolves to it")
    assert resolve_device("auto") in ("cpu", "mps")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16  # the rule, whatever this machine has
    assert resolve_dtype("float16", "cpu") == torch.float16  # accepted anywhere
    assert Placement("cpu", "bfloat16").describe() == {"device": "cpu", "dtype": "bfloat16", "device_map": None}
    with pytest.raises(UserError, match="unknown --device"):
        resolve_device("gpu")
    with pytest.raises(UserError, match="unknown --dtype"):
        resolve_dtype("fp8", "cpu")
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")


def test_a_model_loads_on_the_device_and_in_the_dtype_asked(model_dirs):
    lm = load_model(str(model_dirs["llama"]), "bfloat16", "cpu")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
    assert next(load_model(str(model_dirs["llama"])).model.parameters()).dtype == torch.float32  # auto on cpu


@pytest.mark.parametrize("argv", [
    ["extract", "--data", "x.jsonl", "--model", "m", "--sae", "s", "--out", "o.safetensors", "--device", "cuda:0"],
    ["predict", "--dtype", "float8"],
    ["evaluate", "--out", "ev", "--device", "tpu"],
    ["finetune", "--out", "ft", "--report-to", "mlflow"],
    ["validate", "--device-map", "balanced"],
])
def test_bad_placement_options_exit_2_with_one_line_before_loading(argv, cli_fails, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if torch.cuda.is_available() and "cuda:0" in argv:
        pytest.skip("a CUDA device is visible")
    line = cli_fails(argv)
    assert any(w in line for w in ("--device", "--dtype", "--report-to", "--device-map")), line
    assert not list(tmp_path.iterdir())  # nothing written


def _examples() -> list[Example]:
    # lengths from a few tokens to a few dozen: sorting and budgets change the batches
    return [Example(t * (1 + i % 3), f"answer {i}", "d", str(i)) for i, t in enumerate(CORPUS * 2)]


@pytest.mark.parametrize("budget, cap", [(1, None), (48, None), (200, 3), (100_000, None)])
def test_statistics_do_not_depend_on_the_batch_layout(model_dirs, sae_dirs, budget, cap):
    """Any --batch-tokens (and --batch-size cap) gives the statistics of one sequence per
    forward pass: single runs, paired shifts with per-example entries, and a token limit."""
    lm = load_model(str(model_dirs["llama"]))
    sae = load_sae(str(sae_dirs["topk"]))
    exs = _examples()
    render = Render(chat=True, tokens="response")
    reference = ex.Extractor(lm, sae, HookPoint(2), batch_size=1, batch_tokens=100_000)
    engine = ex.Extractor(lm, sae, HookPoint(2), batch_size=cap, batch_tokens=budget)
    for limit in (None, 37):
        want = reference.stats(sequences(exs, lm.tokenizer, Render()), max_tokens=limit)
        got = engine.stats(sequences(exs, lm.tokenizer, Render()), max_tokens=limit)
        assert got.count == want.count and torch.equal(got.fires, want.fires)
        assert_same_reduction(got.sum, want.sum, length=TINY_FORWARD + want.count)
        assert_same_reduction(got.sum_sq, want.sum_sq, length=TINY_FORWARD + want.count)
    want = ex.shift_stats(reference, "icl", exs, render, demos=2, seed=0)["sae"]
    got = ex.shift_stats(engine, "icl", exs, render, demos=2, seed=0)["sae"]
    assert got.per_example.examples == want.per_example.examples == len(exs)
    assert_same_reduction(got.sum_sq_diff, want.sum_sq_diff, length=TINY_FORWARD + want.a.count)
    everything = list(range(sae.d_sae))
    assert_same_reduction(got.example_shift(everything), want.example_shift(everything),
                          length=TINY_FORWARD + want.a.count)
    dense_want = reference.dense(sequences(exs, lm.tokenizer, Render()))
    dense_got = engine.dense(sequences(exs, lm.tokenizer, Render()))  # the reference's order
    assert_same_reduction(dense_got, dense_want, length=TINY_FORWARD)


def test_bfloat16_features_and_scores_agree_with_float32(model_dirs, sae_dirs):
    """The tolerance a user can expect from --dtype bfloat16: per-feature means within 5% of
    their scale and the same top shifted features, on a tiny random model."""
    from sts.scores.score import feature_values

    sae = load_sae(str(sae_dirs["topk"]))
    exs = _examples()
    out = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(str(model_dirs["llama"]), dtype, "cpu")
        engine = ex.Extractor(lm, sae, HookPoint(2))
        single = engine.stats(sequences(exs, lm.tokenizer, Render()))
        shift = ex.shift_stats(engine, "icl", exs, Render(chat=True, tokens="response"), demos=2)["sae"]
        out[dtype] = (single, shift)
    (s32, sh32), (s16, sh16) = out["float32"], out["bfloat16"]
    m32, m16 = s32.sum / s32.count, s16.sum / s16.count
    assert float((m16 - m32).abs().max()) <= 0.05 * float(m32.abs().max())
    top32 = set(torch.topk(sh32.sum_sq_diff, 10).indices.tolist())
    top16 = set(torch.topk(sh16.sum_sq_diff, 10).indices.tolist())
    assert len(top32 & top16) >= 8
    idx = sorted(top32)
    v32, v16 = feature_values("sq", s32)[idx], feature_values("sq", s16)[idx]
    assert float((v16 - v32).abs().max()) <= 0.05 * float(v32.abs().max()) + 1e-6


def test_the_gpu_benchmark_skips_without_a_gpu_and_runs_at_tiny_shapes(monkeypatch, capsys):
    """benchmarks/gpu_extract.py: 'no GPU: skipped' (exit 0) here; --smoke runs its three
    methods on tiny shapes on the CPU, so the script cannot rot unseen between GPU sessions. Run in
    this process, as `python benchmarks/gpu_extract.py` runs it (its torch is already imported)."""
    import runpy
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_extract.py")
    if not torch.cuda.is_available():
        monkeypatch.setattr(sys, "argv", [script])
        runpy.run_path(script, run_name="__main__")
        assert capsys.readouterr().out.strip() == "no GPU: skipped"
    monkeypatch.setattr(sys, "argv", [script, "--smoke", "--budgets", "1024"])
    runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1024", "4096"))]
    assert {r[1] for r in rows} == {"bare", "engine", "reference"} and all(float(r[2]) > 0 for r in rows)


def test_a_shared_prefix_counts_against_the_token_budget(model_dirs, sae_dirs):
    """Domain questions read through their demonstrations' key/value cache: every sequence of a
    batch holds its own copy of the prefix, so the budget counts it (a 4096-token budget with a
    1,600-token prefix once packed 45 questions per batch and took gigabytes); the statistics
    stay those of any other layout."""
    lm = load_model(str(model_dirs["llama"]))
    sae = load_sae(str(sae_dirs["topk"]))
    demos = {d: tuple(Example(f"{d} demonstration {i}: " + "context " * 20, f"answer {i}", d, f"{d}-demo{i}")
                      for i in range(2)) for d in ("a", "b")}
    questions = [Example(f"question {i} about {d}?", None, d, f"{d}{i}") for d in ("a", "b") for i in range(6)]
    render = Render(with_response=False)
    budget = 200
    engine = ex.Extractor(lm, sae, HookPoint(2), batch_tokens=budget)
    pairs = list(domain_icl_pairs(questions, demos, lm.tokenizer, render))
    assert all(p.b.prefix and len(p.b.prefix) > 40 for p in pairs)
    for _, batch in engine.batches(pairs, len(pairs), "test"):
        width = max(len(p.b.prefix) + len(p.b.ids) for p in batch)
        assert len(batch) == 1 or len(batch) * width <= budget
    small = ex.domain_shift_stats(engine, questions, demos, render)
    large = ex.domain_shift_stats(ex.Extractor(lm, sae, HookPoint(2), batch_tokens=100_000), questions, demos, render)
    assert small.a.count == large.a.count > 0
    assert_same_reduction(small.sum_sq_diff, large.sum_sq_diff, length=TINY_FORWARD + large.a.count)
