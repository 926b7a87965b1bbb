"""`--responses generated`: features read on the base model's own answers (transformers
backend on a tiny model), saved beside the outputs and cached."""

from __future__ import annotations

import json

import torch

from sts.engine.stats import load_stats

from .conftest import write_jsonl


def test_extract_reads_features_on_the_generated_tokens(tmp_path, run_cli, model_dirs, sae_dirs, qa_file):
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--shift", "icl",
              "--demos", "1"]
    out = tmp_path / "gen.safetensors"
    run_cli(["extract", *common, "--data", str(qa_file), "--responses", "generated", "--temperature", "0",
             "--max-new-tokens", "12", "--out", str(out)])
    generated = [json.loads(line) for line in (tmp_path / "gen.safetensors.generated.jsonl").read_text().splitlines()]
    dataset = [json.loads(line) for line in qa_file.read_text().splitlines()]
    assert len(generated) == len(dataset) and all(g["response"] for g in generated)
    assert [g["response"] for g in generated] != [d["solution"] for d in dataset]
    # the same statistics as extracting a file whose responses are the generated texts
    rewritten = write_jsonl(tmp_path / "rewritten.jsonl", [{"instruction": g["prompt"], "output": g["response"]}
                                                           for g in generated])
    run_cli(["extract", *common, "--data", str(rewritten), "--out", str(tmp_path / "plain.safetensors")])
    a, b = load_stats(out), load_stats(tmp_path / "plain.safetensors")
    assert a.a.count == b.a.count > 0
    torch.testing.assert_close(a.sum_sq_diff, b.sum_sq_diff)
    assert a.meta["responses"] == "generated" and a.meta["generation"]["temperature"] == 0


def test_predict_saves_the_generated_texts_and_caches_them(tmp_path, run_cli, model_dirs, sae_dirs, qa_file,
                                                          domain_file, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    argv = ["predict", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
            "--domains", str(domain_file), "--k", "8", "--responses", "generated", "--max-new-tokens", "10",
            "--out", str(tmp_path / "out")]
    first = run_cli(argv)
    assert "generating responses to 5 training prompts (temperature 0.6" in first.err
    texts = (tmp_path / "out" / "generated.jsonl").read_text().splitlines()
    assert len(texts) == 5 and all(json.loads(t)["response"] for t in texts)
    again = run_cli(argv)
    assert "generating" not in again.err  # cached
    assert (tmp_path / "out" / "generated.jsonl").read_text().splitlines() == texts
    other = run_cli(argv[:-2] + ["--temperature", "0", "--out", str(tmp_path / "greedy")])
    assert "generating" in other.err  # new sampling settings: generated again
