"""`sts validate` end to end on tiny models (fine-tune, evaluate, predict, correlate; the
matrix over training sets; resuming after a kill), and evaluations resumed domain by domain."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sts.analysis import correlation as co
from sts.data.datasets import load_dataset
from sts.defaults import DEFAULT_SCORE
from sts.engine.evaluation import Evaluation
from sts.engine.models import load_model

from .conftest import write_jsonl

CATEGORIES = ["math", "law", "biology", "physics", "history", "health", "economics", "business",
              "philosophy"]


def _domain_file(tmp_path):
    letters = "ABCD"
    records = [{"question_id": f"{cat}{i}", "question": f"{cat} question {i}: what is {i} and {cat}?",
                "options": ["one", "two", "three", "four"], "answer": letters[(i + j) % 4],
                "answer_index": (i + j) % 4, "category": cat, "src": "t"}
               for j, cat in enumerate(CATEGORIES) for i in range(16)]
    return write_jsonl(tmp_path / "d.jsonl", records)


def _reference_file(tmp_path):
    """cot_nll's ground truth: 5 reference records (with a chain of thought) in each of 4 categories
    (3 evaluated with --reference-examples 3, 2 left for the gradient scores' probes)."""
    return write_jsonl(tmp_path / "ref.jsonl", [
        {"question_id": f"r-{cat}{i}", "question": f"another {cat} question {i}?", "options": ["one", "two"],
         "answer": "A", "answer_index": 0, "category": cat, "src": "t",
         "cot_content": f"A: Let's think step by step. {cat} {i} {'x' * i}. The answer is (A)."}
        for cat in CATEGORIES[:4] for i in range(5)])


def test_validate_end_to_end_on_tiny_models(tmp_path, run_cli, model_dirs, sae_dirs, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    domains = _domain_file(tmp_path)
    # cot_nll's ground truth: reference records of 4 categories; math's first record is a
    # training question (the same stem) and must be left out
    reference = write_jsonl(tmp_path / "ref.jsonl", [
        {"question_id": f"r-{cat}{i}", "question": f"{cat} question {i}: what is {i} and {cat}?" if i == 0 and
         cat == "math" else f"another {cat} question {i}?", "options": ["one", "two", "three", "four"],
         "answer": "A", "answer_index": 0, "category": cat, "src": "t",
         "cot_content": f"A: Let's think step by step. {cat} {i}. The answer is (A)."}
        for cat in CATEGORIES[:4] for i in range(4)])
    out = tmp_path / "results"
    captured = run_cli(["validate", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]),
                        "--domains", str(domains), "--train", f"{domains}#category=math", "--max-train", "4",
                        "--predict-examples", "5", "--eval-examples", "5", "--k", "8", "--max-steps", "8",
                        "--ft-batch-size", "2", "--lr", "5e-2", "--replicates", "100", "--out", str(out),
                        "--reference", str(reference), "--reference-examples", "3", "--score", "act"])
    res = json.loads((out / "results.json").read_text())
    assert res["budget"]["reference"]["records_per_domain"] == {c: 3 for c in CATEGORIES[:4]}
    ref = Evaluation.load(out / "eval-base-reference")
    assert "r-math0" not in {r.question_id for r in ref.results} and len(ref.results) == 12
    cot_rows = list(csv.DictReader((out / "matrices" / "change-cot_nll.csv").open()))
    assert set(cot_rows[0]) - {"train"} == set(CATEGORIES[:4])
    direct = co.changes_from_evaluations(ref, Evaluation.load(out / "train-1-d-math" / "eval-tuned-reference"),
                                         "cot_nll")
    assert float(cot_rows[0]["law"]) == pytest.approx(direct["law"].delta, rel=1e-4)
    # the content variant: the same records, their opening "Let's think step by step." as context
    content = list(csv.DictReader((out / "matrices" / "change-cot_nll_content.csv").open()))
    direct = co.changes_from_evaluations(ref, Evaluation.load(out / "train-1-d-math" / "eval-tuned-reference"),
                                         "cot_nll_content")
    assert float(content[0]["law"]) == pytest.approx(direct["law"].delta, rel=1e-4)
    assert direct["law"].delta != pytest.approx(co.changes_from_evaluations(
        ref, Evaluation.load(out / "train-1-d-math" / "eval-tuned-reference"), "cot_nll")["law"].delta, rel=1e-6)
    assert {len(r["domains_used"]) for r in res["per_train"] if r["metric"] == "cot_nll"
            and r["protocol"] == "signed"} == {4}
    assert set(res["correlations"]) == {"icl", "sft"}
    assert {r["domain"] for r in res["cells"]} == set(CATEGORIES)
    assert all(r["questions"] == 5 for r in res["cells"])  # the 4 training questions held out of math
    assert res["budget"]["excluded_questions"]["math"] == 4 and res["budget"]["excluded_questions"]["law"] == 0
    assert set(res["budget"]["metrics"]) == {"acc", "nll", "acc_norm", "p_correct", "cot_nll", "cot_nll_content"}
    # every score and baseline, under every protocol, side by side
    table = {(c["shift"], c["score"], c["protocol"]): c for c in res["comparison"]}
    for score in ("act", "icl", "sq", "rel-act", "rel-icl", "raw-act", "raw-sq", "cosine", "lexical"):
        for protocol in ("signed", "abs", "paper"):
            c = table[("icl", score, protocol)]
            assert -1 <= c["pearson"] <= 1 and len(c["domains_used"]) == (8 if protocol == "paper" else 9)
    assert ("sft", "act", "paper") in table and ("sft", "lexical", "signed") not in table
    assert "outcome" in table[("icl", "act", "paper")]["protocol_note"]
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == len(res["comparison"]) and (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert res["budget"]["domain_demonstrations"]["source"] == "first questions"
    tdir = out / "train-1-d-math"
    for name in ("icl", "sft"):
        assert (tdir / f"correlation-{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tdir / f"predict-{name}" / "sts.json").exists()
    sft = json.loads((tdir / "predict-sft" / "sts.json").read_text())
    assert sft["features"][0]["shift"] > 0  # the tuned model's features moved
    assert (tdir / "tuned" / "config.json").exists() and (tdir / "eval-tuned" / "predictions.csv").exists()
    assert "icl (act, acc, signed): Pearson" in captured.out and "lexical" in captured.out
    assert (out / "matrices" / "change-nll.csv").exists() and (out / "heatmaps.png").exists()


def test_validate_over_two_training_sets_writes_the_matrix_and_resumes(tmp_path, run_cli, model_dirs, sae_dirs,
                                                                        monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    domains = _domain_file(tmp_path)
    out = tmp_path / "results"
    argv = ["validate", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--domains", str(domains),
            "--train", f"{domains}#category=math", "--train", f"{domains}#category=law", "--max-train", "4",
            "--predict-examples", "5", "--eval-examples", "5", "--k", "8", "--max-steps", "4",
            "--ft-batch-size", "2", "--lr", "5e-2", "--replicates", "50", "--metric", "nll", "--out", str(out)]
    first = run_cli(argv)
    res = json.loads((out / "results.json").read_text())
    assert res["stages_reused"] == []
    # the default primary score is a gradient one: validate computes the gradient scores with no flag
    assert {(c["shift"], c["score"]) for c in res["comparison"]} >= {("icl", DEFAULT_SCORE), ("icl", "grad-adam")}
    trains = ["train-1-d-math", "train-2-d-law"]
    assert list(res["budget"]["trains"]) == trains
    # matrices: training sets x domains, and the change matches the evaluations' numbers
    rows = list(csv.DictReader((out / "matrices" / "change-nll.csv").open()))
    assert [r["train"] for r in rows] == trains and len(rows[0]) == 1 + len(CATEGORIES)
    base = Evaluation.load(out / "eval-base")
    tuned = Evaluation.load(out / trains[1] / "eval-tuned")
    direct = co.changes_from_evaluations(base, tuned, "nll")
    assert float(rows[1]["biology"]) == pytest.approx(direct["biology"].delta, rel=1e-4)
    # pooled and specificity correlations, recomputed here from the matrices
    score_rows = list(csv.DictReader((out / "matrices" / "score-icl-act.csv").open()))
    x = np.array([[float(r[d]) for d in sorted(CATEGORIES)] for r in score_rows])
    y = np.array([[float(r[d]) for d in sorted(CATEGORIES)] for r in rows])
    spec = next(r for r in res["matrix"] if (r["kind"], r["shift"], r["score"], r["metric"])
                == ("specificity", "icl", "act", "nll"))
    centre = lambda m: m - m.mean(1, keepdims=True) - m.mean(0, keepdims=True) + m.mean()  # noqa: E731
    assert spec["pearson"] == pytest.approx(np.corrcoef(centre(x).ravel(), centre(y).ravel())[0, 1], abs=1e-3)
    # the range with each domain left out in turn (the rest re-centred)
    loo = [np.corrcoef(centre(np.delete(x, i, 1)).ravel(), centre(np.delete(y, i, 1)).ravel())[0, 1]
           for i in range(len(CATEGORIES))]
    assert spec["pearson_loo"] == pytest.approx([min(loo), max(loo)], abs=1e-3)
    pooled = next(r for r in res["matrix"] if (r["kind"], r["shift"], r["score"], r["metric"])
                  == ("pooled", "icl", "act", "nll"))
    assert pooled["pearson"] == pytest.approx(np.corrcoef(x.ravel(), y.ravel())[0, 1], abs=1e-3)
    assert (out / "specificity.png").read_bytes()[:4] == b"\x89PNG" and "specificity" in first.out
    # the swap test: each set's changes against its own scores and the other set's, by numpy
    swap = next(r for r in res["swap"] if (r["shift"], r["score"], r["metric"]) == ("icl", "act", "nll"))
    own = np.median([np.corrcoef(x[t], y[t])[0, 1] for t in range(2)])
    other = np.median([np.corrcoef(x[1 - t], y[t])[0, 1] for t in range(2)])
    # (the matrices hold 6 significant digits)
    assert (swap["own"], swap["other"], swap["difference"]) == pytest.approx((own, other, own - other), abs=1e-3)
    assert swap["difference_ci"][0] <= swap["difference_ci"][1] and "swap test" in first.out
    assert len(list(csv.DictReader((out / "swap.csv").open()))) == len(res["swap"])
    # each set is drawn from one domain: that domain's rank by every score and by the change
    ranks = {(r["train"], r["score"]): r for r in res["own_domain"]}
    law = ranks[("train-2-d-law", "act")]
    assert law["domain"] == "law" and law["domains"] == len(CATEGORIES)
    by_score = sorted(CATEGORIES, key=lambda d: (-x[1][sorted(CATEGORIES).index(d)], d))
    assert law["score_rank"] == by_score.index("law") + 1
    by_change = sorted(CATEGORIES, key=lambda d: (-y[1][sorted(CATEGORIES).index(d)], d))
    assert law["change_rank"] == by_change.index("law") + 1
    # the library it writes splits a third set's prediction into shared and own parts
    pred_argv = ["predict", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--domains",
                 str(domains), "--train", f"{domains}#category=biology", "--max-train", "4", "--max-examples", "5",
                 "--k", "8", "--library", str(out), "--out", str(tmp_path / "pred")]
    shown = run_cli(pred_argv)
    dec = json.loads((tmp_path / "pred" / "sts.json").read_text())["decomposition"]
    assert dec["library_sets"] == trains and dec["metric"] == "nll" and set(dec["shared"]) == set(CATEGORIES)
    assert all(dec["combined"][d] == pytest.approx(dec["shared"][d] + dec["own"][d]) for d in CATEGORIES)
    assert "shared" in shown.out and "own" in shown.out
    from .conftest import assert_bad_input

    other_sae = [a if a != str(sae_dirs["topk"]) else str(sae_dirs["standard"]) for a in pred_argv]
    assert_bad_input(run_cli(other_sae, expect=None), "another SAE")
    # a simulated kill: one stage's output removed, another's corrupted; the rest is reused
    import shutil

    shutil.rmtree(out / trains[1] / "eval-tuned")
    (out / trains[0] / "scores-sft.json").write_text("{}")
    run_cli(argv)
    again = json.loads((out / "results.json").read_text())
    redone = {f"{trains[1]}: evaluate tuned", f"{trains[0]}: predict (sft)"}
    stages = {"evaluate base"} | {f"{t}: {s}" for t in trains
                                  for s in ("predict (icl)", "finetune", "evaluate tuned", "predict (sft)")}
    assert set(again["stages_reused"]) == stages - redone and redone <= set(again["timings_s"])
    assert again["matrix"] == res["matrix"]  # deterministic: the same numbers
    # a new machine: the (uncommitted) adapters are gone. Where every stage that reads one verified
    # against the hashes its fine-tune recorded, nothing runs and no adapter is rebuilt; where one
    # such stage is gone too, that set's fine-tune runs again, and only its stages
    shutil.rmtree(out / trains[0] / "tuned")
    shutil.rmtree(out / trains[1] / "tuned")
    shutil.rmtree(out / trains[1] / "eval-tuned")
    run_cli(argv)
    fresh = json.loads((out / "results.json").read_text())
    rebuilt = {f"{trains[1]}: finetune", f"{trains[1]}: evaluate tuned"}
    sft = {f"{trains[1]}: predict (sft)"}  # reused where the second fine-tune gave the same bytes
    assert set(fresh["stages_reused"]) - sft == stages - rebuilt - sft
    assert rebuilt <= set(fresh["timings_s"]) and fresh["matrix"] == res["matrix"]
    assert not (out / trains[0] / "tuned").exists() and (out / trains[1] / "tuned" / "config.json").exists()
    # a changed option recomputes the stages it affects, and only those
    run_cli([("3" if a == "4" and argv[i - 1] == "--max-steps" else a) for i, a in enumerate(argv)])
    third = json.loads((out / "results.json").read_text())
    assert set(third["stages_reused"]) == {"evaluate base"} | {f"{t}: predict (icl)" for t in trains}


def test_an_evaluation_stopped_midway_resumes_from_its_finished_domains(tmp_path, model_dirs):
    """A session can end inside a long evaluation: finished domains are kept and the rerun
    evaluates only the rest, with the same result as one uninterrupted run; other model
    files (a retrained model) throw the parts away."""
    from sts.engine.evaluation import evaluate
    from sts.validation.validate import evaluate_in_parts

    groups = {d: qs for d, qs in load_dataset(str(_domain_file(tmp_path))).by_domain().items()}
    groups = {d: qs[:3] for d, qs in list(groups.items())[:3]}
    lm = load_model(str(model_dirs["llama"]))
    calls: list[str] = []

    def run(model, part, stop_at=None):
        domain = next(iter(part))
        if domain == stop_at:
            raise KeyboardInterrupt  # the session ends here
        calls.append(domain)
        return evaluate(model, part, show_progress=False)

    where = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        evaluate_in_parts(str(model_dirs["llama"]), lambda: lm, where, groups, {},
                          lambda m, p: run(m, p, stop_at=list(groups)[2]))
    assert calls == list(groups)[:2] and not (where / "accuracy.json").exists()
    evaluate_in_parts(str(model_dirs["llama"]), lambda: lm, where, groups, {}, run)
    assert calls == list(groups)  # only the third domain ran again
    once = evaluate(lm, groups, show_progress=False)
    resumed = Evaluation.load(where)
    def answers(ev: Evaluation) -> list[tuple]:
        return [(r.question_id, r.predicted) for r in ev.results]

    assert answers(resumed) == answers(once)
    assert [r.nll for r in resumed.results] == pytest.approx([r.nll for r in once.results], rel=1e-4)
    assert not where.with_name("eval.part").exists()
    # parts of another model are not reused
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate_in_parts(str(model_dirs["llama"]), lambda: lm, tmp_path / "e2", groups, {},
                          lambda m, p: run(m, p, stop_at=list(groups)[1]))
    evaluate_in_parts(str(model_dirs["qwen2"]), lambda: lm, tmp_path / "e2", groups, {}, run)
    assert calls == [list(groups)[0]] + list(groups)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data (the transfer experiment's training sets)")
def test_the_transfer_experiments_finished_stages_keep_their_keys():
    """Every stage of docs/results/transfer (run.sh's command) still verifies under today's
    stage keys: a change to what keys a stage (dtype, first token) must leave those runs' keys
    as they were. The model and SAE are the paths the experiment ran with; keys only compare
    settings, so nothing is loaded."""
    import json

    from sts.engine.settings import FinetuneSpec
    from sts.validation.config import ValidateConfig
    from sts.validation.plan import plan_data
    from sts.validation.stages import manifest_name, settings_key

    root = Path(__file__).resolve().parents[1] / "docs" / "results" / "transfer"
    command = (root / "run.sh").read_text()
    d = "../shared/data"  # run.sh's $D, relative to the repository root
    trains = ["embedded:champ", f"{d}/alpaca_en_demo.json", f"{d}/mmlu_pro_cot_train.jsonl#category=physics",
              f"{d}/mmlu_pro_cot_train.jsonl#category=psychology", f"{d}/math500_test.jsonl",
              f"{d}/mmlu_pro_cot_train.jsonl#category=business", f"{d}/mmlu_pro_cot_train.jsonl#category=biology"]
    assert command.count("--train ") == len(trains) and "--k 100" in command and "--score act" in command
    cfg = ValidateConfig(out=Path("docs/results/transfer"), train=trains,
                         exclude=["../shared/data/mmlu_pro_test.jsonl"],
                         domain_demos="../shared/data/mmlu_pro_cot_demos.jsonl",
                         reference="../shared/data/mmlu_pro_cot_train.jsonl", max_train=100, k=100,
                         finetune=FinetuneSpec(max_steps=60, batch_size=4), score="act", metric="nll",
                         model="/root/.cache/sts/smollm2-135m-instruct",
                         sae="/work/main/src/sts/assets/sae-smollm2-135m-l22")
    cwd = Path.cwd()
    try:
        os.chdir(root.parents[2])  # the specs are relative to the repository root, as run.sh ran them
        settings = plan_data(cfg).stage_settings()
    finally:
        os.chdir(cwd)
    assert len(settings) == 2 + 5 * len(trains)
    for name, value in settings.items():
        manifest = json.loads((root / "stages" / manifest_name(name)).read_text())
        assert manifest["key"] == settings_key(value), name


def test_a_round_on_cot_nll_alone_skips_the_stages_it_does_not_need(tmp_path, run_cli, model_dirs, sae_dirs,
                                                                   monkeypatch):
    """--no-question-evaluation --no-sft-shift: per set only predict (icl), finetune and the
    reference evaluation; the analysis runs on cot_nll, and each stage's manifest is the plan's."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    domains = _domain_file(tmp_path)
    reference = _reference_file(tmp_path)
    out = tmp_path / "round"
    run_cli(["validate", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--domains", str(domains),
             "--train", f"{domains}#category=math", "--train", f"{domains}#category=law", "--max-train", "4",
             "--predict-examples", "5", "--k", "8", "--max-steps", "2", "--ft-batch-size", "2", "--replicates", "20",
             "--reference", str(reference), "--reference-examples", "3", "--metric", "cot_nll",
             "--no-question-evaluation", "--no-sft-shift", "--gradients", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    manifests = {p.stem for p in (out / "stages").glob("*.json")}
    per_set = ("predict_icl_", "finetune", "evaluate_tuned_reference_")
    assert manifests == {"evaluate_base_reference_"} | {f"train-{i}-d-{c}_{s}" for i, c in ((1, "math"), (2, "law"))
                                                        for s in per_set}
    assert not (out / "eval-base").exists() and res["budget"]["metrics"] == ["cot_nll", "cot_nll_content"]
    assert {r["shift"] for r in res["per_train"]} == {"icl"} and res["swap"]
    assert sorted(p.name for p in (out / "matrices").iterdir())[0] == "change-cot_nll.csv"
    # the gradient scores' domain side is the ground truth's loss on the reference records' domains,
    # read on probe records that no evaluation measured (both lists recorded)
    grad = list(csv.DictReader((out / "matrices" / "score-icl-grad.csv").open()))
    assert set(grad[0]) - {"train"} == set(CATEGORIES[:4])
    split = res["budget"]["probes"]
    evaluated = {r["question_id"] for r in csv.DictReader((out / "eval-base-reference" / "predictions.csv").open())}
    assert {d: len(q) for d, q in split["evaluation"].items()} == {c: 3 for c in CATEGORIES[:4]}
    assert {u for q in split["evaluation"].values() for u in q} == evaluated
    assert {d: len(q) for d, q in split["probes"].items()} == {c: 2 for c in CATEGORIES[:4]}
    assert not evaluated & {u for q in split["probes"].values() for u in q}
    # its library says what each score read: a prediction of another kind gets no split from it
    sides = json.loads((out / "library.json").read_text())["sides"]
    assert sides["grad"] == "ref.jsonl: reference chains of thought" and sides["act"] == "d.jsonl: questions"
    assert any(r["score"] == "grad-adam" for r in res["swap"])
    from .conftest import assert_bad_input

    assert_bad_input(run_cli(["validate", "--no-question-evaluation", "--out", str(tmp_path / "x")], expect=None),
                     "--reference and --metric cot_nll")


@pytest.mark.parametrize("metric", ["cot_nll", "cot_nll_content"])
def test_the_gradient_domain_side_takes_the_primary_metrics_loss(tmp_path, model_dirs, sae_dirs, metric):
    """--metric cot_nll_content: the gradient scores' domain side leaves the references' openings
    out (its loss is the ground truth's), and the prediction stage's key says so; cot_nll keeps
    the key the held-out round's stages were written under."""
    from sts.validation.config import ValidateConfig
    from sts.validation.plan import plan_data

    domains = _domain_file(tmp_path)
    reference = _reference_file(tmp_path)
    cfg = ValidateConfig(out=tmp_path / "v", train=[f"{domains}#category=math"], domains=str(domains),
                         reference=str(reference), reference_examples=3, metric=metric,
                         model=str(model_dirs["llama"]), sae=str(sae_dirs["topk"]), gradients=True)
    pl = plan_data(cfg)
    content = metric == "cot_nll_content"
    assert pl.gradient_content is content
    train = pl.inputs.trains[0]
    assert pl.predict_config(train, "icl", tmp_path / "t").gradient_content is content
    assert ("gradient_loss" in pl.prediction(train)) is content


def test_probe_records_never_overlap_the_evaluated_ones(tmp_path, model_dirs, sae_dirs):
    """The default split: each domain's first records are evaluated, the probes a seeded draw from
    the rest (another seed, another draw; never an evaluated record), on the reference records and,
    without them, on the domain questions; a user's own probes that share a question are refused."""
    from sts.errors import UserError
    from sts.validation.config import ValidateConfig
    from sts.validation.plan import plan_data

    domains = _domain_file(tmp_path)
    reference = write_jsonl(tmp_path / "ref.jsonl", [
        {"question_id": f"r-{cat}{i}", "question": f"another {cat} question {i}?", "options": ["one", "two"],
         "answer": "A", "answer_index": 0, "category": cat, "src": "t",
         "cot_content": f"A: Let's think step by step. {cat} {i}. The answer is (A)."}
        for cat in CATEGORIES[:3] for i in range(12)])
    base = {"out": tmp_path / "v", "train": [f"{domains}#category=math"], "domains": str(domains),
            "model": str(model_dirs["llama"]), "sae": str(sae_dirs["topk"]), "gradients": True}

    def split(**kw):
        return plan_data(ValidateConfig(**(base | kw))).inputs.probes

    on_refs = split(reference=str(reference), reference_examples=4, probe_records=5, metric="cot_nll")
    for d in CATEGORIES[:3]:
        evaluated, probes = [e.uid for e in on_refs.evaluation[d]], [e.uid for e in on_refs.probes[d]]
        assert evaluated == [f"r-{d}{i}" for i in range(4)] and len(probes) == 5
        assert not set(evaluated) & set(probes)
    assert on_refs.describe()["probes"] != split(reference=str(reference), reference_examples=4, probe_records=5,
                                                 metric="cot_nll", seed=1).describe()["probes"]
    on_questions = split(eval_examples=6, probe_records=4, metric="nll")
    for d, q in on_questions.evaluation.items():
        assert len(q) == 6 and not {e.uid for e in q} & {e.uid for e in on_questions.probes[d]}
    own = write_jsonl(tmp_path / "own.jsonl", [
        {"question_id": "mine", "question": "another law question 2?", "options": ["one", "two"], "answer": "A",
         "answer_index": 0, "category": "law", "src": "t", "cot_content": "A: so. The answer is (A)."}])
    with pytest.raises(UserError, match="also evaluated records"):
        split(reference=str(reference), reference_examples=4, metric="cot_nll", probes=str(own))
    with pytest.raises(UserError, match="no probe record is left"):
        split(reference=str(reference), reference_examples=12, metric="cot_nll")
