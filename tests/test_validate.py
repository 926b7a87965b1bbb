"""Ground truth on tiny models: fine-tune, evaluate, correlate, validate."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy import stats as sps

from sts import correlation as co
from sts.cli import main
from sts.data import Example, load_dataset
from sts.evaluation import Evaluation, evaluate, extract_answer, letter_tokens
from sts.finetuning import FinetuneSpec, finetune, response_loss
from sts.models import LoadedModel, load_model

from .conftest import SHARED, make_model, write_jsonl

ANSWERS = {"math": "ABBDCBAB", "law": "CCDABBAC", "biology": "BBBBADCA"}


def mc_examples() -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    for domain, letters in ANSWERS.items():
        out[domain] = [Example(f"Question {i} about {domain}?\nA. one\nB. two\nC. three\nD. four",
                               f"The answer is ({a})", domain, f"{domain}-{i}",
                               choices=("one", "two", "three", "four"), answer=a)
                       for i, a in enumerate(letters)]
    return out


def rigged_b_model(tokenizer) -> LoadedModel:
    """A tiny model whose next token is always 'B': the LM head is replaced by a linear layer
    with zero weights and a bias that favours the token for 'B' (and for ' B' if the
    vocabulary has it), so any prompt's logits put 'B' first."""
    model = make_model("llama", len(tokenizer))
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        _, ids = letter_tokens(tokenizer)
        head.bias[ids[1]] = 10.0
    model.lm_head = head
    return LoadedModel(model, tokenizer, "rigged-B")


# --- evaluate -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["mc", "cot"])
def test_model_rigged_to_answer_b_scores_the_share_of_b(tokenizer, mode):
    domains = mc_examples()
    ev = evaluate(rigged_b_model(tokenizer), domains, mode=mode, batch_size=3, max_new_tokens=1,
                  show_progress=False)
    assert {r.predicted for r in ev.results} == {"B"}
    acc = ev.accuracy()
    for domain, letters in ANSWERS.items():
        assert acc[domain]["questions"] == len(letters)
        assert acc[domain]["accuracy"] == pytest.approx(letters.count("B") / len(letters))


def test_few_shot_questions_are_demonstrations_not_scored(tokenizer, tmp_path):
    ev = evaluate(rigged_b_model(tokenizer), mc_examples(), shots=2, show_progress=False)
    for domain, letters in ANSWERS.items():
        assert ev.accuracy()[domain]["accuracy"] == pytest.approx(letters[2:].count("B") / len(letters[2:]))
    ev.save(tmp_path / "ev")
    back = co.changes_from_evaluations(ev, type(ev).load(tmp_path / "ev"))
    assert all(c.delta == 0 for c in back.values())
    rows = list(csv.DictReader((tmp_path / "ev" / "predictions.csv").open()))
    assert len(rows) == sum(len(a) - 2 for a in ANSWERS.values())


OUTPUTS = [  # (generated text, expected letter) — MMLU-Pro's extraction order
    ("Let's think step by step. Mass is conserved, so the answer is (C).", "C"),
    ("The answer is D because the integral diverges.", "D"),
    ("so the answer is (J)", "J"),
    ("Step 1: compute 2+2.\nAnswer: B", "B"),
    ("We compare the options.\nanswer: G\nDone.", "G"),
    ("Option A is too small and option E is too large, so I pick F", "F"),
    ("I believe it is (H).", "H"),
    ("the answer is (A). Wait, the answer is (B).", "A"),  # the first 'answer is' wins
    ("Answer: E. Although answer is unclear", "E"),
    ("No idea, sorry.", None),
    ("The value is 42 kg.", None),
    ("ANSWER IS K", None),  # K is not an option letter
]


@pytest.mark.parametrize("text,expected", OUTPUTS)
def test_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_evaluate_cli_rejects_questions_without_options(tmp_path, capsys, model_dirs):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello", "category": "a"}])
    exit_code = main(["evaluate", "--model", str(model_dirs["llama"]), "--domains", str(data),
          "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert exit_code == 2 and "multiple-choice" in err and "Traceback" not in err
    assert not (tmp_path / "ev" / "accuracy.json").exists()


# --- finetune --------------------------------------------------------------------------------

def test_finetune_lowers_response_loss_and_saves_a_loadable_model(tokenizer, tmp_path):
    lm = LoadedModel(make_model("llama", len(tokenizer)), tokenizer, "tiny")
    exs = [Example(f"What is {i} plus {i}?", f"The answer is {2 * i}.", "math", str(i)) for i in range(8)]
    before = response_loss(lm, exs)
    result = finetune(lm, exs, FinetuneSpec(max_steps=8, lr=5e-3, batch_size=4, warmup_steps=0),
                      tmp_path / "ft")
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]
    tuned = load_model(str(tmp_path / "ft"))
    assert response_loss(tuned, exs) < before - 0.05
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").exists()
    meta = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert meta["losses"] == result.losses and meta["spec"]["lora"] is True
    assert not (tmp_path / "ft.part").exists()


def test_loss_is_on_response_tokens_only(tokenizer, tmp_path):
    """The batches the trainer sees carry labels on the response (and its end-of-turn
    marker) and -100 on every prompt and chat-template token."""
    from sts.finetuning import build_trainer

    lm = LoadedModel(make_model("llama", len(tokenizer)), tokenizer, "tiny")
    exs = [Example("What is two plus two?", "The answer is four.", None, "1"),
           Example("Solve for x: 2x = 8.", "Divide by two, so x = 4.", None, "2")]
    trainer = build_trainer(lm, exs, FinetuneSpec(max_steps=1, batch_size=2), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = tokenizer.decode(ids[labels != -100])
        assert trained.strip() in {f"{e.response}<|im_end|>" for e in exs}, trained
        assert "What is" not in trained and "user" not in trained
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(lm.model.parameters(), trainer.model.parameters()))


# --- correlate ---------------------------------------------------------------------------------

STS = {"a": 0.9, "b": 0.4, "c": 0.7, "d": 0.1, "e": 0.4}
BASE = {"a": [0, 1, 0, 0, 1, 0], "b": [1, 1, 0, 1, 0, 1], "c": [0, 0, 1, 0, 1, 0],
        "d": [1, 1, 1, 0, 1, 1], "e": [0, 1, 1, 0, 0, 1]}
TUNED = {"a": [1, 1, 1, 0, 1, 1], "b": [1, 1, 0, 1, 0, 0], "c": [1, 0, 1, 1, 1, 0],
         "d": [1, 0, 1, 0, 1, 0], "e": [0, 1, 1, 1, 0, 1]}


def _changes() -> dict[str, co.DomainChange]:
    return {d: co.DomainChange(np.array(BASE[d], float), np.array(TUNED[d], float)) for d in STS}


def test_correlation_matches_scipy_and_bootstrap_matches_scipy_bootstrap():
    changes = _changes()
    corr = co.correlate(STS, changes, replicates=3000, seed=1)
    x = np.array([STS[d] for d in sorted(STS)])
    y = np.array([100 * (np.mean(TUNED[d]) - np.mean(BASE[d])) for d in sorted(STS)])
    assert corr.pearson == pytest.approx(sps.pearsonr(x, y).statistic, abs=1e-12)
    assert corr.spearman == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)  # with a tie in x
    loo = [sps.pearsonr(np.delete(x, i), np.delete(y, i)).statistic for i in range(len(x))]
    assert corr.pearson_loo == pytest.approx((min(loo), max(loo)), abs=1e-12)

    # The same bootstrap through scipy: each domain's paired differences are one sample,
    # resampled independently; the statistic is Pearson of STS against the domain means.
    samples = [np.array(TUNED[d], float) - np.array(BASE[d], float) for d in sorted(STS)]

    def stat(*s):
        ys = np.array([100 * np.mean(v) for v in s])
        return np.corrcoef(x, ys)[0, 1] if np.ptp(ys) > 0 else np.nan

    ref = sps.bootstrap(samples, stat, vectorized=False, paired=False, n_resamples=3000,
                        method="percentile", random_state=np.random.default_rng(2))
    assert corr.pearson_ci[0] == pytest.approx(ref.confidence_interval.low, abs=0.06)
    assert corr.pearson_ci[1] == pytest.approx(ref.confidence_interval.high, abs=0.06)
    assert corr.pearson_ci[0] < corr.pearson < corr.pearson_ci[1]


@pytest.mark.parametrize("unstable", [True, False])
def test_bootstrap_over_training_examples_widens_the_interval(unstable):
    """When the training examples do not settle which features are S (six features compete
    for k = 3 places), resampling them must widen the interval of a correlation that the
    questions alone pin down; when S is settled (three features far ahead), it must not."""
    from sts.score import ShiftSamples

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    example_shift = torch.rand(30, 12, dtype=torch.float64) * 0.2
    if unstable:
        example_shift[:, :6] += torch.rand(30, 6, dtype=torch.float64)
    else:
        example_shift[:, :3] += 5.0
    domains = [f"d{i}" for i in range(8)]
    means = {d: torch.rand(12, dtype=torch.float64) * 10 for d in domains}
    samples = ShiftSamples(list(range(12)), example_shift, means, k=3)
    scores = samples.scores()
    assert scores == {d: float(m[example_shift.sum(0).argsort(descending=True)[:3]].mean()) for d, m in means.items()}
    # changes that follow the scores, on many questions: the questions alone give a narrow interval
    changes = {d: co.DomainChange(np.zeros(400), scores[d] + rng.normal(0, 1, 400), 1.0) for d in domains}
    fixed = co.correlate(scores, changes, 500, seed=0)
    both = co.correlate(scores, changes, 500, seed=0, resample_sts=co.resampler(samples))
    assert both.pearson == fixed.pearson and len(both.resampled) == 2
    width = lambda c: c.pearson_ci[1] - c.pearson_ci[0]  # noqa: E731
    assert width(fixed) < 0.01
    if unstable:
        assert width(both) > 0.2
    else:
        assert width(both) < 0.01


def test_correlate_writes_json_csv_and_scatter(tmp_path, capsys):
    (tmp_path / "sts.json").write_text(json.dumps({"scores": STS}))
    from sts.evaluation import Evaluation, QuestionResult

    for name, table in (("base", BASE), ("tuned", TUNED)):
        Evaluation(name, "mc", 0, [QuestionResult(f"{d}{i}", d, "A", "A" if c else "B")
                                   for d, v in table.items() for i, c in enumerate(v)]).save(tmp_path / name)
    exit_code = main(["correlate", "--sts", str(tmp_path / "sts.json"), "--base", str(tmp_path / "base"),
          "--tuned", str(tmp_path / "tuned"), "--out", str(tmp_path / "c"), "--replicates", "200"])
    assert exit_code == 0
    out = json.loads((tmp_path / "c" / "correlation.json").read_text())
    # the oracle: accuracy changes in points counted from the tables, then scipy
    x = [STS[d] for d in sorted(STS)]
    y = [100 * (sum(TUNED[d]) - sum(BASE[d])) / len(BASE[d]) for d in sorted(STS)]
    assert out["pearson"] == pytest.approx(sps.pearsonr(x, y).statistic, abs=1e-9)
    assert out["spearman"] == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-9)
    assert out["pearson_ci"][0] < out["pearson"] < out["pearson_ci"][1]
    assert len(out["domains"]) == 5
    assert (tmp_path / "c" / "correlation.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pearson" in capsys.readouterr().out


def test_correlate_names_a_missing_table_column(tmp_path, capsys):
    (tmp_path / "sts.json").write_text(json.dumps({"scores": STS}))
    (tmp_path / "t.csv").write_text("question_id,m1,m2\n1,A,B\n")
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "question": "?", "options": ["x", "y"],
                                            "answer": "A", "answer_index": 0, "category": "a", "src": "s"}])
    exit_code = main(["correlate", "--sts", str(tmp_path / "sts.json"), "--table", str(tmp_path / "t.csv"),
          "--questions", str(q), "--base-model", "m1", "--tuned-model", "nope",
          "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert exit_code == 2 and "no column nope" in err and "m1, m2" in err
    assert not (tmp_path / "c" / "correlation.json").exists()


@pytest.mark.skipif(not (SHARED / "data" / "mmlu_pro_predictions.csv").exists(),
                    reason="needs ../shared/data (MMLU-Pro predictions and questions)")
def test_prediction_table_mistral_to_mathstral():
    data = SHARED / "data"
    truth = {}
    with open(data / "mmlu_pro_test.jsonl") as fh:
        for line in fh:
            r = json.loads(line)
            truth[str(r["question_id"])] = (r["category"], r["answer"])
    hand: dict[str, list[int]] = {}
    with open(data / "mmlu_pro_predictions.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            cat, ans = truth[r["question_id"]]
            c = hand.setdefault(cat, [0, 0, 0])
            c[0] += r["Mistral-7B-v0.1"] == ans
            c[1] += r["mathstral-7B"] == ans
            c[2] += 1
    changes = co.changes_from_table(data / "mmlu_pro_predictions.csv", str(data / "mmlu_pro_test.jsonl"),
                                    "Mistral-7B-v0.1", "mathstral-7B")
    assert set(changes) == set(hand) and len(changes) == 14
    for cat, (b, t, n) in hand.items():
        assert changes[cat].questions == n
        assert changes[cat].delta == pytest.approx(100 * (t - b) / n)
    # the shifts DESIGN.md quotes for this pair, in whole points (chemistry is 23.50 here)
    for cat, points in {"math": 27, "chemistry": 24, "engineering": 17, "law": 2, "history": 3}.items():
        assert changes[cat].delta == pytest.approx(points, abs=0.51)


# --- validate ----------------------------------------------------------------------------------

CATEGORIES = ["math", "law", "biology", "physics", "history", "health", "economics", "business",
              "philosophy"]


def _domain_file(tmp_path):
    letters = "ABCD"
    records = [{"question_id": f"{cat}{i}", "question": f"{cat} question {i}: what is {i} and {cat}?",
                "options": ["one", "two", "three", "four"], "answer": letters[(i + j) % 4],
                "answer_index": (i + j) % 4, "category": cat, "src": "t"}
               for j, cat in enumerate(CATEGORIES) for i in range(16)]
    return write_jsonl(tmp_path / "d.jsonl", records)


def _validate(argv, capsys):
    exit_code = main(["validate", *argv])
    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    return captured


def test_validate_end_to_end_on_tiny_models(tmp_path, capsys, model_dirs, sae_dirs, monkeypatch):
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
    captured = _validate(["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]),
                          "--domains", str(domains), "--train", f"{domains}#category=math", "--max-train", "4",
                          "--predict-examples", "5", "--eval-examples", "5", "--k", "8", "--max-steps", "8",
                          "--ft-batch-size", "2", "--lr", "5e-2", "--replicates", "100", "--out", str(out),
                          "--reference", str(reference), "--reference-examples", "3"], capsys)
    res = json.loads((out / "results.json").read_text())
    assert res["budget"]["reference"]["records_per_domain"] == {c: 3 for c in CATEGORIES[:4]}
    ref = Evaluation.load(out / "eval-base-reference")
    assert "r-math0" not in {r.question_id for r in ref.results} and len(ref.results) == 12
    cot_rows = list(csv.DictReader((out / "matrices" / "change-cot_nll.csv").open()))
    assert set(cot_rows[0]) - {"train"} == set(CATEGORIES[:4])
    direct = co.changes_from_evaluations(ref, Evaluation.load(out / "train-1-d-math" / "eval-tuned-reference"),
                                         "cot_nll")
    assert float(cot_rows[0]["law"]) == pytest.approx(direct["law"].delta, rel=1e-4)
    assert {len(r["domains_used"]) for r in res["per_train"] if r["metric"] == "cot_nll"
            and r["protocol"] == "signed"} == {4}
    assert set(res["correlations"]) == {"icl", "sft"}
    assert {r["domain"] for r in res["cells"]} == set(CATEGORIES)
    assert all(r["questions"] == 5 for r in res["cells"])  # the 4 training questions held out of math
    assert res["budget"]["excluded_questions"]["math"] == 4 and res["budget"]["excluded_questions"]["law"] == 0
    assert set(res["budget"]["metrics"]) == {"acc", "nll", "acc_norm", "p_correct", "cot_nll"}  # cot: reference
    # every score and baseline, under every protocol, side by side
    table = {(c["shift"], c["score"], c["protocol"]): c for c in res["comparison"]}
    for score in ("act", "icl", "sq", "raw-act", "raw-sq", "cosine", "lexical"):
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
    assert "icl (sq, acc, signed): Pearson" in captured.out and "lexical" in captured.out
    assert (out / "matrices" / "change-nll.csv").exists() and (out / "heatmaps.png").exists()


def test_validate_over_two_training_sets_writes_the_matrix_and_resumes(tmp_path, capsys, model_dirs, sae_dirs,
                                                                        monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    domains = _domain_file(tmp_path)
    out = tmp_path / "results"
    argv = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--domains", str(domains),
            "--train", f"{domains}#category=math", "--train", f"{domains}#category=law", "--max-train", "4",
            "--predict-examples", "5", "--eval-examples", "5", "--k", "8", "--max-steps", "4",
            "--ft-batch-size", "2", "--lr", "5e-2", "--replicates", "50", "--metric", "nll", "--out", str(out)]
    first = _validate(argv, capsys)
    res = json.loads((out / "results.json").read_text())
    assert res["stages_reused"] == []
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
    # a simulated kill: one stage's output removed, another's corrupted; the rest is reused
    import shutil

    shutil.rmtree(out / trains[1] / "eval-tuned")
    (out / trains[0] / "scores-sft.json").write_text("{}")
    _validate(argv, capsys)
    again = json.loads((out / "results.json").read_text())
    redone = {f"{trains[1]}: evaluate tuned", f"{trains[0]}: predict (sft)"}
    stages = {"evaluate base"} | {f"{t}: {s}" for t in trains
                                  for s in ("predict (icl)", "finetune", "evaluate tuned", "predict (sft)")}
    assert set(again["stages_reused"]) == stages - redone and redone <= set(again["timings_s"])
    assert again["matrix"] == res["matrix"]  # deterministic: the same numbers
    # a changed option recomputes the stages it affects, and only those
    _validate([("3" if a == "4" and argv[i - 1] == "--max-steps" else a) for i, a in enumerate(argv)], capsys)
    third = json.loads((out / "results.json").read_text())
    assert set(third["stages_reused"]) == {"evaluate base"} | {f"{t}: predict (icl)" for t in trains}


def test_per_example_shifts_add_up_to_the_shift_and_survive_save(tmp_path, model_dirs, sae_dirs):
    from sts import extract as ex
    from sts.models import parse_hook_name
    from sts.saes import load_sae

    sae = load_sae(str(sae_dirs["topk"]))
    engine = ex.Extractor(load_model(str(model_dirs["llama"])), sae, parse_hook_name(sae.hook_name), 2)
    exs = [Example(f"What is {i} plus {i}?", f"It is {2 * i}.", None, str(i)) for i in range(5)]
    stats = ex.shift_stats(engine, "icl", exs, ex.Render(chat=True, tokens="response"), demos=2)["sae"]
    per = stats.example_shift(list(range(sae.d_sae)))
    assert per.shape == (5, sae.d_sae) and (per.sum(1) > 0).all()
    assert torch.allclose(per.sum(0), stats.sum_sq_diff, rtol=1e-5, atol=1e-6)
    stats.save(tmp_path / "s.safetensors")
    back = ex.Stats.load(tmp_path / "s.safetensors")
    assert torch.equal(back.example_shift([3, 1]), per[:, [3, 1]])


def test_finetune_reports_dropped_and_cut_records_and_stops_when_none_is_left(tokenizer, tmp_path):
    from sts.errors import UserError
    from sts.finetuning import fitted_length, length_report, token_lengths

    lm = LoadedModel(make_model("llama", len(tokenizer)), tokenizer, "tiny")
    exs = [Example("Short question?", "Short answer.", None, "0"),
           Example("A much longer question " * 8, "An answer.", None, "1"),
           Example("Q?", "A long chain of thought " * 10, None, "2")]
    lengths = token_lengths(exs, tokenizer)
    prompt_1, full_2 = lengths[1][0], lengths[2][1]
    limit = max(lengths[0][1], lengths[2][0]) + 1  # example 0 fits, 1's prompt fills it, 2 is cut
    assert prompt_1 >= limit and full_2 > limit
    assert length_report(lengths, limit) == {"records": 3, "dropped": 1, "cut": 1, "kept": 2,
                                             "max_length": limit, "longest": max(f for _, f in lengths)}
    fitted = fitted_length(lengths)
    assert fitted % 64 == 0 and fitted >= max(f for _, f in lengths) and length_report(lengths, fitted)["cut"] == 0
    with pytest.raises(UserError, match="nothing to train on"):
        finetune(lm, exs, FinetuneSpec(max_length=8, max_steps=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_signal_is_the_spread_across_domains_over_the_standard_error():
    rng = np.random.default_rng(0)
    changes = {d: co.DomainChange(rng.normal(2.0, 0.5, 50), rng.normal(2.0 - shift, 0.5, 50), gain=-1.0)
               for d, shift in {"a": 0.1, "b": 0.3, "c": 0.9}.items()}
    got = co.signal(changes)
    deltas = np.array([c.base.mean() - c.tuned.mean() for c in changes.values()])
    sems = np.array([np.std(c.tuned - c.base, ddof=1) / np.sqrt(50) for c in changes.values()])
    assert got["spread"] == pytest.approx(deltas.std(ddof=1))
    assert got["signal"] == pytest.approx(deltas.std(ddof=1) / np.sqrt((sems ** 2).mean()))
    dev = (deltas - deltas.mean()) ** 2
    assert got["largest_share"] == pytest.approx(dev.max() / dev.sum()) and got["largest_share"] > 0.5


def test_an_evaluation_stopped_midway_resumes_from_its_finished_domains(tmp_path, model_dirs):
    """A session can end inside a long evaluation: finished domains are kept and the rerun
    evaluates only the rest, with the same result as one uninterrupted run; other model
    files (a retrained model) throw the parts away."""
    from sts.evaluation import evaluate
    from sts.validation import evaluate_in_parts

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
    assert [(r.question_id, r.predicted) for r in resumed.results] == [(r.question_id, r.predicted) for r in once.results]
    assert [r.nll for r in resumed.results] == pytest.approx([r.nll for r in once.results], rel=1e-4)
    assert not where.with_name("eval.part").exists()
    # parts of another model are not reused
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate_in_parts(str(model_dirs["llama"]), lambda: lm, tmp_path / "e2", groups, {},
                          lambda m, p: run(m, p, stop_at=list(groups)[1]))
    evaluate_in_parts(str(model_dirs["qwen2"]), lambda: lm, tmp_path / "e2", groups, {}, run)
    assert calls == [list(groups)[0]] + list(groups)
