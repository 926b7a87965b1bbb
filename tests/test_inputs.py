"""Model inputs (`sts.data.inputs`): which tokens count, and ICL pairs aligned on the example's own tokens."""

from __future__ import annotations

import pytest

from sts.data.examples import Example
from sts.data.inputs import Render, Truncation, align, icl_pairs, sequences
from sts.engine.models import load_model
from sts.errors import UserError

from .conftest import CORPUS


@pytest.fixture(scope="module")
def llama(model_dirs):
    return load_model(str(model_dirs["llama"]))


def test_plain_text_tokens_are_exactly_the_tokenizers(llama):
    seqs = list(sequences([Example(t, None, None, "0") for t in CORPUS[:2]], llama.tokenizer, Render()))
    for seq, text in zip(seqs, CORPUS[:2]):
        assert seq.ids == llama.tokenizer(text)["input_ids"]
        assert seq.positions == list(range(len(seq.ids)))


def test_response_selection_counts_only_the_response(llama):
    tok = llama.tokenizer
    example = Example("What is 2 + 3?", "Add them: 5.", None, "0")
    seq = next(sequences([example], tok, Render(chat=True, tokens="response")))
    picked = tok.decode([seq.ids[p] for p in seq.positions])
    assert picked.strip() == "Add them: 5."
    whole = next(sequences([example], tok, Render(chat=True, tokens="all")))
    assert len(whole.positions) == len(whole.ids) > len(seq.positions)


@pytest.mark.parametrize("chat", [True, False])
def test_icl_pairs_align_the_examples_own_tokens(llama, chat):
    tok = llama.tokenizer
    pool = [Example(q, r, None, str(i)) for i, (q, r) in enumerate([
        ("What is 2 + 3?", "Add them: 2 + 3 = 5."), ("Solve 2x = 8.", "Divide by 2, x = 4."),
        ("What is 9 - 4?", "Subtract: 5."), ("Name a fruit.", "An apple.")])]
    for tokens in ("response", "all"):
        render = Render(chat=chat, tokens=tokens)
        pairs = list(icl_pairs(pool, tok, render, n_demos=2, seed=1))
        for ex_, pair in zip(pool, pairs):
            assert len(pair.b.ids) > len(pair.a.ids)  # demonstrations were prepended
            ids_a = [pair.a.ids[p] for p in pair.a.positions]
            ids_b = [pair.b.ids[p] for p in pair.b.positions]
            assert ids_a == ids_b and ids_a
            # the aligned tokens sit at the end of the shifted input, in the same order
            assert pair.b.positions == sorted(pair.b.positions)
            if tokens == "response":
                assert tok.decode(ids_a).strip() == ex_.response
            else:
                assert ex_.prompt in tok.decode(ids_a)


def test_skip_first_leaves_out_each_sequences_first_token(tokenizer):
    exs = [Example("Solve for x: 2x + 3 = 7.", None, "math", "1"), Example("The quick fox.", None, "x", "2")]
    keep = list(sequences(exs, tokenizer, Render(with_response=False)))
    skip = list(sequences(exs, tokenizer, Render(with_response=False, skip_first=True)))
    for a, b in zip(keep, skip):
        assert a.ids == b.ids and a.positions[0] == 0 and b.positions == a.positions[1:]


def test_over_long_icl_pair_keeps_its_demonstrations_and_cuts_the_example(llama):
    """An example too long for max_length with its demonstrations keeps every demonstration
    token; its end is cut, by the same tokens on both sides; the cut is reported."""
    tok = llama.tokenizer
    long_answer = " ".join(f"step {i}: add {i} and {i} to get {2 * i}." for i in range(40))
    pool = [Example("What is 2 + 3?", "Add them: 5.", None, "0"), Example("Solve 2x = 8.", "x = 4.", None, "1"),
            Example("Sum the first forty doubles.", long_answer, None, "2")]
    render = Render(chat=True, tokens="response")
    demos = (pool[0], pool[1])
    whole = align(tok, pool[2], demos, render, None)
    assert whole.cut == 0 and len(whole.b.ids) > 200
    cut = align(tok, pool[2], demos, render, max_length=200)
    assert len(cut.b.ids) == 200 and cut.cut == len(whole.b.ids) - 200
    assert cut.b.ids[: cut.head] == whole.b.ids[: whole.head]  # demonstrations whole
    ids_a = [cut.a.ids[p] for p in cut.a.positions]
    assert ids_a == [cut.b.ids[p] for p in cut.b.positions] and len(ids_a) > 10
    assert long_answer.startswith(tok.decode(ids_a).strip())  # the response's start survives
    # Demonstrations alone longer than max_length: nothing aligned, and the report says so.
    report = Truncation()
    pairs = list(icl_pairs(pool[:2] + [pool[2]], tok, render, n_demos=2, seed=0, max_length=20,
                              report=report))
    assert all(not p.a.positions for p in pairs) and report.empty == report.examples == 3
    with pytest.raises(UserError, match="no training example keeps an aligned token"):
        report.check("training example", 20)
