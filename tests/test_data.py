"""Datasets: files saved locally, MMLU rows, the embedded files and their checksums, the shared
MMLU-Pro and MATH-500 schemas, domain demonstrations, and the contamination guard."""

from __future__ import annotations

import pytest

from sts.data.datasets import decontaminate, domain_demonstrations, load_dataset
from sts.data.embedded import package_file
from sts.data.examples import Example
from sts.data.records import MMLU_TO_CATEGORY
from sts.errors import UserError

from .conftest import DOMAINS, SHARED, needs_shared, write_jsonl


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
    from sts import defaults
    from sts.data.embedded import CHAMP

    assert defaults.TRAIN == "embedded:champ"
    package_file(*CHAMP)  # verifies the sha256
    champ = load_dataset("embedded:champ")
    assert champ.schema == "math" and len(champ.examples) == 270
    first = champ.examples[0]
    assert first.prompt.startswith("Let a string consist of digit 1, 2, 3.")
    assert first.response.splitlines()[0].startswith("Let x_n, y_n, z_n be the number")
    assert len(champ.domains()) >= 4 and all(e.response for e in champ.examples)


@needs_shared
def test_shared_mmlu_pro_and_math500_schemas():
    pro = load_dataset(str(SHARED / "data" / "mmlu_pro_test.jsonl"))
    assert pro.schema == "mmlu_pro" and len(pro.domains()) == 14 and len(pro.examples) == 12_032
    math = load_dataset(str(SHARED / "data" / "math500_test.jsonl"), max_examples=5)
    assert math.schema == "math" and math.examples[0].response


def test_domain_demonstrations_from_a_file_use_the_chain_of_thought(tmp_path):
    records = [{"question_id": i, "question": q, "options": ["yes", "no"], "answer": "A", "answer_index": 0,
                "category": d, "src": "t", "cot_content": f"A: Let's think step by step. {d} {i}. The answer is (A)."}
               for d, qs in DOMAINS.items() for i, q in enumerate(qs[:3])]
    spec = str(write_jsonl(tmp_path / "demos.jsonl", records))
    groups = {d: [Example(f"{q}\nA. yes\nB. no", None, d, f"{d}{i}") for i, q in enumerate(qs)]
              for d, qs in DOMAINS.items()}
    demos, left = domain_demonstrations(groups, 2, spec)
    for d in DOMAINS:
        assert [e.response for e in demos.demos[d]] == [
            f"Let's think step by step. {d} {i}. The answer is (A)." for i in range(2)]
        # a demonstration is never also a scored question; the rest stay, in order
        assert [e.uid for e in left[d]] == [f"{d}{i}" for i in range(2, 5)]
    with pytest.raises(UserError, match="fewer than 4 demonstrations"):
        domain_demonstrations(groups, 4, spec)
    with pytest.raises(UserError, match="no questions left"):
        domain_demonstrations(groups, 5)


def test_contamination_guard_leaves_out_training_questions_by_their_stem(tmp_path):
    domain = [Example("What is 2 + 3?\nA. 5\nB. 6", None, "math", "0", choices=("5", "6"), answer="A"),
              Example("What  is 9 - 4?\nA. 5\nB. 4\nC. 3", None, "math", "1", choices=("5", "4", "3"), answer="A"),
              Example("Define a tort.\nA. a wrong\nB. a cake", None, "law", "2", choices=("a wrong", "a cake"),
                      answer="A")]
    # the same question with other options (as MMLU-Pro re-letters MMLU's), other spacing and case
    train = [Example("what is 9 - 4?\nA. 4\nB. 5\nC. 6\nD. 7", "The answer is (B)", "math", "t0",
                     choices=("4", "5", "6", "7"), answer="B"),
             Example("Solve 2x = 8.", "x = 4", None, "t1")]
    kept, removed = decontaminate({"math": domain[:2], "law": domain[2:]}, train)
    assert [e.uid for e in kept["math"]] == ["0"] and removed == {"math": 1, "law": 0}
    records = [{"question": e.prompt.split("\nA. ")[0], "options": list(e.choices), "answer": e.answer,
                "category": e.domain, "question_id": e.uid} for e in domain]
    spec = str(write_jsonl(tmp_path / "d.jsonl", records))
    assert len(load_dataset(spec + "#category=law").examples) == 1
    with pytest.raises(Exception, match="has no domain"):
        load_dataset(spec + "#category=physics")


def test_a_row_selector_takes_a_slice_of_the_records_in_order(tmp_path):
    from .conftest import write_jsonl

    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": f"p{i}", "solution": f"s{i}"} for i in range(10)])
    part = load_dataset(f"{path}#rows=7:10")
    assert [e.prompt for e in part.examples] == ["p7", "p8", "p9"] and part.spec.endswith("#rows=7:10")
    with pytest.raises(UserError, match="none from row 12"):
        load_dataset(f"{path}#rows=12:20")
    with pytest.raises(UserError, match="START < END"):
        load_dataset(f"{path}#rows=5:2")
