"""Evaluation on tiny models: the ground-truth metrics that move on small models (nll,
acc_norm, p_correct, cot_nll, cot_nll_content), each against a direct computation; packing; models rigged to
prefer one answer; few-shot demonstrations; answer extraction; `sts evaluate`'s bad input."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from sts.analysis import correlation as co
from sts.data.examples import Example
from sts.engine.evaluation import cloze_context, cot_messages, evaluate, extract_answer, letter_tokens
from sts.engine.models import LoadedModel

from .conftest import assert_bad_input, make_model, write_jsonl

OPTIONS = ("one apple", "two pears", "three plums", "four figs")
# MMLU-Pro's templated openings: law's reference has the Wikipedia sentence, math's does not
OPENING = {"math": "", "law": " We refer to Wikipedia articles on law for help."}


def _questions() -> dict[str, list[Example]]:
    out = {}
    for d, letters in {"math": "ABCD", "law": "DCB"}.items():
        out[d] = [Example(f"Question {i} about {d}?\nA. {OPTIONS[0]}\nB. {OPTIONS[1]}\nC. {OPTIONS[2]}\n"
                          f"D. {OPTIONS[3]}", None, d, f"{d}{i}", choices=OPTIONS, answer=a,
                          cot=(f"Let's think step by step.{OPENING[d]} It is {a}. The answer is ({a})."
                               if i % 2 else None))
                  for i, a in enumerate(letters)]
    return out


def _logprob(model, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation | context) from one plain forward pass over both."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(logp[len(context) + i - 1, t] for i, t in enumerate(continuation)))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_likelihood_metrics_equal_a_direct_computation(tokenizer, family):
    """Packed scoring (several questions per forward, options as branches of a tree mask)
    gives what one plain forward per context + continuation gives; gemma2's sliding window
    (16 tokens here, shorter than the items) included."""
    lm = LoadedModel(make_model(family, len(tokenizer)), tokenizer, "tiny")
    ev = evaluate(lm, _questions(), show_progress=False)
    by_id = {r.question_id: r for r in ev.results}
    for d, exs in _questions().items():
        for e in exs:
            r = by_id[e.uid]
            context = cloze_context(e, [])
            assert context.endswith(f"Question {e.uid[-1]} about {d}?\nAnswer:")  # no options in the cloze
            ctx = tokenizer(context)["input_ids"]
            conts = [tokenizer(context + " " + o)["input_ids"][len(ctx):] for o in OPTIONS]
            ll = [_logprob(lm.model, ctx, c) for c in conts]
            right = "ABCD".index(e.answer)
            assert r.nll == pytest.approx(-ll[right] / len(conts[right]), rel=1e-4)
            probs = np.exp(np.array(ll) - max(ll))
            assert r.p_correct == pytest.approx(probs[right] / probs.sum(), rel=1e-4)
            per_char = [t / len(" " + o) for t, o in zip(ll, OPTIONS)]
            assert r.acc_norm == float(int(np.argmax(per_char)) == right)
            if e.cot is None:
                assert r.cot_nll is None
            else:
                msgs = cot_messages(e, [])
                prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                whole = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": e.cot}],
                                                      tokenize=False)
                p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                cont = tokenizer(whole, add_special_tokens=False)["input_ids"][len(p_ids):]
                assert r.cot_nll == pytest.approx(-_logprob(lm.model, p_ids, cont) / len(cont), rel=1e-4)
                # content: the tokens after the opening's last full stop, the opening as context
                opening = whole[:whole.index(" It is")]
                k = len(tokenizer(opening, add_special_tokens=False)["input_ids"]) - len(p_ids)
                assert 0 < k < len(cont) and opening.endswith("step by step." + OPENING[d])
                expected = -_logprob(lm.model, p_ids + cont[:k], cont[k:]) / (len(cont) - k)
                assert r.cot_nll_content == pytest.approx(expected, rel=1e-4)
            letter_logits = _letter_logprobs(lm, e)
            assert r.predicted == "ABCD"[int(np.argmax(letter_logits))]
    metrics = ev.metrics()
    assert metrics["math"]["cot_nll"]["questions"] == 2 and metrics["law"]["nll"]["questions"] == 3
    reference = evaluate(lm, _questions(), mode="reference", show_progress=False)
    with_cot = [r for r in ev.results if r.cot_nll is not None]
    assert [r.question_id for r in reference.results] == [r.question_id for r in with_cot]
    assert [r.cot_nll for r in reference.results] == pytest.approx([r.cot_nll for r in with_cot], rel=1e-4)
    assert [r.cot_nll_content for r in reference.results] == pytest.approx([r.cot_nll_content for r in with_cot],
                                                                           rel=1e-4)
    assert "acc" not in reference.metrics()["math"] and reference.metrics()["math"]["cot_nll"]["questions"] == 2


def _letter_logprobs(lm: LoadedModel, e: Example) -> list[float]:
    from sts.engine.evaluation import letter_tokens, mc_prompt

    suffix, ids = letter_tokens(lm.tokenizer)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([lm.tokenizer(mc_prompt(e, []) + suffix)["input_ids"]])).logits
    return [float(logits[0, -1, i]) for i in ids[:len(e.choices)]]


def test_packing_does_not_change_the_numbers(tokenizer):
    """One item per forward and many per forward give the same log-likelihoods."""
    from sts.engine.likelihoods import Scoring, packed_logprobs

    lm = LoadedModel(make_model("gemma2", len(tokenizer)), tokenizer, "tiny")
    rng = np.random.default_rng(0)
    items = [Scoring([int(t) for t in rng.integers(5, 200, int(rng.integers(1, 30)))],
                     [[int(t) for t in rng.integers(5, 200, int(rng.integers(0, 6)))] for _ in range(3)])
             for _ in range(12)]
    alone = packed_logprobs(lm, items, row_tokens=1, batch_tokens=1)  # one item per forward
    layouts = (dict(row_tokens=10_000), dict(row_tokens=1, batch_tokens=10_000), dict(row_tokens=40, batch_tokens=80))
    for layout in layouts:
        together = packed_logprobs(lm, items, **layout)  # one row; padded rows of one item; both
        for a, b in zip(alone, together):
            assert [n for _, n in a] == [n for _, n in b]
            assert [t for t, _ in a] == pytest.approx([t for t, _ in b], rel=1e-4, abs=1e-4)


def test_a_model_rigged_to_prefer_the_correct_text_gains_on_every_metric(tokenizer, tmp_path):
    """The base model is random; the tuned one has its LM head biased towards the tokens of
    'two pears' (option B): on questions whose answer is B its nll falls and p_correct rises."""
    base = LoadedModel(make_model("llama", len(tokenizer)), tokenizer, "base")
    tuned_model = make_model("llama", len(tokenizer))
    favoured = set(tokenizer(" two pears", add_special_tokens=False)["input_ids"])
    head = torch.nn.Linear(tuned_model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.copy_(tuned_model.lm_head.weight)
        head.bias.zero_()
        head.bias[list(favoured)] = 8.0
    tuned_model.lm_head = head
    tuned = LoadedModel(tuned_model, tokenizer, "tuned")
    qs = {"b": [Example(f"Pick {i}?", None, "b", f"b{i}", choices=OPTIONS, answer="B") for i in range(4)],
          "a": [Example(f"Pick {i}?", None, "a", f"a{i}", choices=OPTIONS, answer="A") for i in range(4)]}
    ev_base, ev_tuned = evaluate(base, qs, show_progress=False), evaluate(tuned, qs, show_progress=False)
    assert all(r.acc_norm == 1.0 and r.p_correct > 0.9 for r in ev_tuned.results if r.domain == "b")
    nll = co.changes_from_evaluations(ev_base, ev_tuned, "nll")
    p = co.changes_from_evaluations(ev_base, ev_tuned, "p_correct")
    assert nll["b"].delta > 1.0 and nll["a"].delta < nll["b"].delta  # a gain in nats/token
    assert p["b"].delta >= 0 > p["a"].delta  # points: mass moves to B, away from A
    ev_tuned.save(tmp_path / "t")  # the metrics survive the files
    back = type(ev_tuned).load(tmp_path / "t")
    assert [r.nll for r in back.results] == pytest.approx([r.nll for r in ev_tuned.results], rel=1e-5)


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


def test_evaluate_cli_rejects_questions_without_options(tmp_path, run_cli, model_dirs):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello", "category": "a"}])
    result = run_cli(["evaluate", "--model", str(model_dirs["llama"]), "--domains", str(data),
                      "--out", str(tmp_path / "ev")], expect=2)
    assert_bad_input(result, "multiple-choice", out=tmp_path / "ev")
