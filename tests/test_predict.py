"""`sts predict` end to end on tiny models, its cache, and the data paths it reads."""

from __future__ import annotations

import csv
import json

import pytest

from sts.cli import main
from sts.data import MMLU_TO_CATEGORY, load_dataset
from sts.embedded import package_file
from sts.errors import UserError

from .conftest import QUESTIONS, SHARED, write_jsonl


def _predict(argv, capsys):
    exit_code = main(["predict", *argv])
    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    return captured


@pytest.fixture
def predict_args(tmp_path, model_dirs, sae_dirs, qa_file, domain_file, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    return ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
            "--domains", str(domain_file), "--k", "8", "--out", str(tmp_path / "out")]


def test_predict_writes_ranking_json_csv_png_and_features(tmp_path, capsys, predict_args):
    captured = _predict(predict_args, capsys)
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


def test_second_run_reuses_cache_and_any_change_invalidates_it(tmp_path, capsys, predict_args):
    _predict(predict_args, capsys)
    entries = sorted((tmp_path / "cache" / "extract").glob("*.safetensors"))
    assert len(entries) == 1 + len(QUESTIONS)  # one shift, one per domain
    first = json.loads((tmp_path / "out" / "sts.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in entries}
    _predict(predict_args, capsys)
    assert {p: p.stat().st_mtime_ns for p in entries} == mtimes  # nothing recomputed
    assert json.loads((tmp_path / "out" / "sts.json").read_text())["scores"] == first["scores"]
    _predict(predict_args + ["--demos", "1"], capsys)  # new demonstrations: a new shift entry
    assert len(list((tmp_path / "cache" / "extract").glob("*.safetensors"))) == len(entries) + 1


def test_corrupted_cache_entry_is_recomputed(tmp_path, capsys, predict_args):
    _predict(predict_args, capsys)
    first = json.loads((tmp_path / "out" / "sts.json").read_text())
    victim = sorted((tmp_path / "cache" / "extract").glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the tensor data: still loads, but must not be trusted
    victim.write_bytes(bytes(data))
    captured = _predict(predict_args, capsys)
    assert "corrupted" in captured.err
    assert json.loads((tmp_path / "out" / "sts.json").read_text())["scores"] == first["scores"]


def test_predict_bad_k_fails_cleanly(tmp_path, capsys, predict_args):
    exit_code = main(["predict", *predict_args, "--k", "100000"])
    assert exit_code == 2
    assert capsys.readouterr().err.strip().startswith("sts: error: k must be between 1")
    assert not (tmp_path / "out" / "sts.json").exists()


def test_loader_reads_datasets_saved_locally(tmp_path):
    import datasets

    rows = {"question": ["q1", "q2"], "solution": ["s1", "s2"], "answer": ["1", "2"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    assert [e.prompt for e in load_dataset(str(tmp_path / "saved")).examples] == ["q1", "q2"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert load_dataset(str(tmp_path / "dd")).schema == "limo"
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "x.parquet"))
    assert len(load_dataset(str(tmp_path / "x.parquet")).examples) == 2


def test_mmlu_rows_map_to_mmlu_pro_categories_and_malformed_rows_are_skipped(tmp_path, capsys):
    base = {"answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4"}
    path = write_jsonl(tmp_path / "mmlu.jsonl", [
        {"question": "1+1?", **base, "correct_answer": "B", "topic": "elementary mathematics"},
        {"question": "bad", **base, "correct_answer": "answer", "topic": "virology"},
        {"question": "law?", **base, "correct_answer": "A", "topic": "professional law"},
    ])
    ds = load_dataset(str(path))
    assert [(e.domain, e.answer) for e in ds.examples] == [("math", "B"), ("law", "A")]
    assert ds.skipped == 1 and "record 2" in capsys.readouterr().err
    assert len(set(MMLU_TO_CATEGORY.values())) == 14


def test_embedded_file_checksum_is_verified():
    with pytest.raises(UserError, match="make setup"):
        package_file("sts", "errors.py", "0" * 64)
    with pytest.raises(UserError, match="make setup"):
        package_file("sts", "no_such_file.bin", "0" * 64)


def test_embedded_champ_is_the_default_training_set():
    """CHAMP ships in champ-dataset==1.0.0 (installed by make setup, sha256-checked): 270
    competition-math problems, each with its step-by-step solution as one response."""
    from sts.cli import DEFAULT_TRAIN
    from sts.embedded import CHAMP

    assert DEFAULT_TRAIN == "embedded:champ"
    package_file(*CHAMP)  # verifies the sha256
    champ = load_dataset("embedded:champ")
    assert champ.schema == "math" and len(champ.examples) == 270
    first = champ.examples[0]
    assert first.prompt.startswith("Let a string consist of digit 1, 2, 3.")
    assert first.response.splitlines()[0].startswith("Let x_n, y_n, z_n be the number")
    assert len(champ.domains()) >= 4 and all(e.response for e in champ.examples)


needs_shared = pytest.mark.skipif(not (SHARED / "data").exists(), reason="../shared/data is absent")


@needs_shared
def test_shared_mmlu_pro_and_math500_schemas():
    pro = load_dataset(str(SHARED / "data" / "mmlu_pro_test.jsonl"))
    assert pro.schema == "mmlu_pro" and len(pro.domains()) == 14 and len(pro.examples) == 12_032
    math = load_dataset(str(SHARED / "data" / "math500_test.jsonl"), max_examples=5)
    assert math.schema == "math" and math.examples[0].response


@needs_shared
def test_predict_on_shared_mmlu_pro_and_math500(tmp_path, capsys, model_dirs, sae_dirs, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    data = SHARED / "data"
    _predict(["--model", str(model_dirs["qwen2"]), "--sae", str(sae_dirs["jumprelu"]),
              "--train", str(data / "math500_test.jsonl"), "--domains", str(data / "mmlu_pro_test.jsonl"),
              "--max-train", "4", "--max-examples", "1", "--max-length", "2048", "--k", "5",
              "--out", str(tmp_path / "out")], capsys)
    result = json.loads((tmp_path / "out" / "sts.json").read_text())
    assert len(result["ranking"]) == 14 and all(r["questions"] == 1 for r in result["ranking"])
    assert result["score"] == "sq" and result["truncation"]["train"]["cut"] == 0
    # STS_ICL with MMLU-Pro's chain-of-thought demonstrations of each category
    _predict(["--model", str(model_dirs["qwen2"]), "--sae", str(sae_dirs["jumprelu"]),
              "--train", str(data / "math500_test.jsonl"), "--domains", str(data / "mmlu_pro_test.jsonl"),
              "--max-train", "4", "--max-examples", "1", "--max-length", "2048", "--k", "5",
              "--score", "icl", "--domain-demos", str(data / "mmlu_pro_cot_demos.jsonl"),
              "--domain-demos-n", "1", "--out", str(tmp_path / "icl")], capsys)
    icl = json.loads((tmp_path / "icl" / "sts.json").read_text())
    assert icl["score"] == "icl" and len(icl["ranking"]) == 14 and all(r["sts"] > 0 for r in icl["ranking"])
    assert icl["demonstrations"]["source"].endswith("mmlu_pro_cot_demos.jsonl")
    assert all(len(v) == 1 for v in icl["demonstrations"]["per_domain"].values())
