"""The extraction engine: SAE features, streamed statistics, padding, paired runs, the .pt
contract; `sts extract` end to end. (Which tokens count and how pairs align: test_inputs.py.)"""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE

from sts.data.datasets import load_dataset
from sts.data.examples import Example
from sts.data.inputs import (
    ModelInput,
    Pair,
    Render,
    domain_icl_pairs,
    icl_pairs,
    icl_sequences,
    same_token_pairs,
    sequences,
)
from sts.engine import extract as ex
from sts.engine.models import HookPoint, load_model, parse_hook_name
from sts.engine.saes import load_sae
from sts.engine.stats import load_stats

from .conftest import CORPUS
from .tolerance import TINY_FORWARD, assert_same_reduction


def _hidden(lm, text, layer):
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**enc, output_hidden_states=True)
    return out.hidden_states[layer + 1][0], enc["input_ids"][0].tolist()


@pytest.fixture(scope="module")
def llama(model_dirs):
    return load_model(str(model_dirs["llama"]))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_features_equal_sae_lens_encode(llama, sae_dirs, arch):
    sae = load_sae(str(sae_dirs[arch]))
    point = parse_hook_name(sae.hook_name)
    engine = ex.Extractor(llama, sae, point, batch_size=3)
    seqs = list(sequences([Example(t, None, None, str(i)) for i, t in enumerate(CORPUS)],
                             llama.tokenizer, Render()))
    got = engine.dense(seqs)
    reference = SAE.load_from_disk(sae_dirs[arch])
    expected = []
    for text in CORPUS:
        hidden, _ = _hidden(llama, text, point.layer)
        with torch.no_grad():
            expected.append(reference.encode(hidden))
    expected = torch.cat(expected)
    assert (expected > 0).any() and (expected == 0).any()  # the SAE is sparse but not dead
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_streamed_stats_equal_dense_computation(llama, sae_dirs):
    engine = ex.Extractor(llama, load_sae(str(sae_dirs["standard"])), HookPoint(2), batch_size=3)
    examples = [Example(t, None, None, str(i)) for i, t in enumerate(CORPUS)]
    dense = engine.dense(sequences(examples, llama.tokenizer, Render())).double()
    stats = engine.stats(sequences(examples, llama.tokenizer, Render()))
    assert stats.count == dense.shape[0]
    torch.testing.assert_close(stats.sum, dense.sum(0))
    torch.testing.assert_close(stats.sum_sq, (dense ** 2).sum(0))
    assert torch.equal(stats.fires, (dense > 0).sum(0))
    # max_tokens keeps exactly the first N tokens
    first = engine.stats(sequences(examples, llama.tokenizer, Render()), max_tokens=20)
    assert first.count == 20
    torch.testing.assert_close(first.sum_sq, (dense[:20] ** 2).sum(0))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_padding_does_not_change_results(model_dirs, sae_dirs, family):
    lm = load_model(str(model_dirs[family]))
    sae = load_sae(str(sae_dirs["topk"]))
    examples = [Example(t, None, None, str(i)) for i, t in enumerate(CORPUS)]  # varied lengths
    one = ex.Extractor(lm, sae, HookPoint(2), batch_size=1)
    many = ex.Extractor(lm, sae, HookPoint(2), batch_size=5)
    seqs = list(sequences(examples, lm.tokenizer, Render()))
    assert len({len(s.ids) for s in seqs}) > 1
    a, b = one.dense(seqs), many.dense(seqs)
    assert a.shape[0] == sum(len(s.ids) for s in seqs)  # pad tokens are never counted
    assert_same_reduction(b, a, length=TINY_FORWARD)
    sa, sb = one.stats(seqs), many.stats(seqs)
    assert sa.count == sb.count
    assert_same_reduction(sb.sum_sq, sa.sum_sq, length=TINY_FORWARD + sa.count)


def test_icl_shift_compares_the_same_tokens_and_equals_a_dense_computation(llama, sae_dirs):
    """Each ICL pair aligns the example's own tokens (the same ids on both sides), and the
    streamed shift equals sum over those tokens of (f_demos - f_alone)^2 from dense features;
    with nothing different on the two sides (identical pairs) it is exactly zero."""
    engine = ex.Extractor(llama, load_sae(str(sae_dirs["standard"])), HookPoint(2), batch_size=2)
    pool = [Example(t, t, None, str(i)) for i, t in enumerate(CORPUS)]
    render = Render(chat=True, tokens="response")
    pairs = list(icl_pairs(pool, llama.tokenizer, render, n_demos=2))
    for p in pairs:
        assert [p.a.ids[i] for i in p.a.positions] == [p.b.ids[i] for i in p.b.positions]
        assert len(p.b.ids) > len(p.a.ids)  # the demonstrations are there
    dense_a = engine.dense([p.a for p in pairs]).double()
    dense_b = engine.dense([p.b for p in pairs]).double()
    icl = engine.paired(iter(pairs))
    assert icl.a.count == dense_a.shape[0] > 0
    torch.testing.assert_close(icl.sum_sq_diff, ((dense_b - dense_a) ** 2).sum(0), rtol=1e-5, atol=1e-6)
    assert float(icl.sum_sq_diff.max()) > 0.0
    same = engine.paired(same_token_pairs(pool, llama.tokenizer, render))
    assert same.a.count == icl.a.count and float(same.sum_sq_diff.abs().max()) == 0.0
    torch.testing.assert_close(icl.a.sum_sq, same.a.sum_sq)  # the base side is the example alone


def test_index_aligned_streams_equal_dense_rows(llama, sae_dirs):
    engine = ex.Extractor(llama, load_sae(str(sae_dirs["standard"])), HookPoint(2), batch_size=2)
    pool = [Example(t, t[::-1], None, str(i)) for i, t in enumerate(CORPUS)]
    render = Render(tokens="all")
    seqs_a = list(sequences(pool, llama.tokenizer, render))
    seqs_b = list(icl_sequences(pool, llama.tokenizer, render, 2, 0))
    a, b = engine.dense(seqs_a).double(), engine.dense(seqs_b).double()
    for n in (7, 50, 10_000):
        got = engine.index_aligned(iter(seqs_a), iter(seqs_b), max_tokens=n)
        rows = min(n, a.shape[0], b.shape[0])
        assert got.a.count == rows
        torch.testing.assert_close(got.sum_sq_diff, ((b[:rows] - a[:rows]) ** 2).sum(0))


def test_stats_file_round_trip(tmp_path, llama, sae_dirs):
    engine = ex.Extractor(llama, load_sae(str(sae_dirs["standard"])), HookPoint(2))
    pool = [Example(t, t, None, str(i)) for i, t in enumerate(CORPUS)]
    stats = engine.paired(icl_pairs(pool, llama.tokenizer, Render(chat=True, tokens="response")))
    stats.meta = {"shift": "icl", "model": "tiny"}
    stats.save(tmp_path / "s.safetensors")
    back = load_stats(tmp_path / "s.safetensors")
    assert back.meta == stats.meta and back.a.count == stats.a.count and back.b.count == stats.b.count
    torch.testing.assert_close(back.sum_sq_diff, stats.sum_sq_diff)
    torch.testing.assert_close(back.b.sum, stats.b.sum)
    assert list(tmp_path.iterdir()) == [tmp_path / "s.safetensors"]  # no temporary left behind


def test_dataset_schemas_feed_the_engine(llama, sae_dirs, qa_file, text_file):
    """A LIMO-style file (question, solution, answer) becomes chat examples whose counted tokens
    are exactly each worked solution; a text file counts every token of each text; the engine
    reads as many feature rows as the sequences count."""
    qa = load_dataset(str(qa_file))
    text = load_dataset(str(text_file))
    assert qa.schema == "limo" and text.schema == "text"
    assert qa.examples[0].response.startswith("Add the numbers: 2 + 3 = 5.")  # the worked solution
    tok = llama.tokenizer
    engine = ex.Extractor(llama, load_sae(str(sae_dirs["topk"])), HookPoint(2))
    response = list(sequences(qa.examples, tok, Render(chat=True, tokens="response")))
    for seq, e in zip(response, qa.examples):
        counted = tok.decode([seq.ids[i] for i in seq.positions])
        assert counted.strip().startswith(e.response.strip()) and "user" not in counted
    everything = list(sequences(text.examples, tok, Render(tokens="all", with_response=False)))
    for seq, e in zip(everything, text.examples):
        assert seq.positions == list(range(len(seq.ids)))
        assert tok.decode(seq.ids).strip().endswith(e.prompt.strip()[-10:])
    for seqs in (response, everything):
        assert engine.stats(iter(seqs)).count == sum(len(s.positions) for s in seqs) > 0


def test_cut_examples_are_counted_and_warned(llama, sae_dirs, capsys):
    engine = ex.Extractor(llama, load_sae(str(sae_dirs["topk"])), HookPoint(2), batch_size=2)
    long_answer = " ".join(f"then {i} more" for i in range(60))
    pool = [Example(f"Question {i}?", long_answer if i == 0 else f"Answer {i}.", None, str(i)) for i in range(4)]
    stats = ex.shift_stats(engine, "icl", pool, Render(chat=True, tokens="response"), demos=2,
                           max_length=120)["sae"]
    info = stats.meta["truncation"]
    assert info["examples"] == 4 and info["cut"] >= 1 and info["tokens_cut"] >= info["max_cut"] > 0
    assert stats.a.count > 0 and float(stats.sum_sq_diff.sum()) > 0
    assert "did not fit --max-length 120" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_shared_demonstrations_read_through_the_kv_cache_equal_full_encoding(model_dirs, sae_dirs, family):
    """Domain ICL pairs read the demonstrations once (key/value cache) and each question after
    them: the same features as encoding every whole input, whatever the batch layout."""
    lm = load_model(str(model_dirs[family]))
    sae = load_sae(str(sae_dirs["standard"]))
    demos = {"m": (Example("What is 2 + 3?", "Add them: 5.", "m", "d0"),
                   Example("Solve 2x = 8.", "Divide: x = 4.", "m", "d1")),
             "b": (Example("What do plants need?", "Light and water.", "b", "d2"),)}
    qs = [Example(t, None, "m" if i % 3 else "b", str(i)) for i, t in enumerate(CORPUS)]
    qs = sorted(qs, key=lambda e: e.domain)
    render = Render(with_response=False, tokens="all", skip_first=True)
    pairs = list(domain_icl_pairs(qs, demos, lm.tokenizer, render))
    assert all(p.b.prefix and p.b.positions for p in pairs)
    whole = [Pair(p.a, ModelInput(list(p.b.prefix) + p.b.ids, [len(p.b.prefix) + i for i in p.b.positions]))
             for p in pairs]
    for batch_size in (1, 4):
        engine = ex.Extractor(lm, sae, HookPoint(2), batch_size=batch_size)
        got = engine.dense([p.b for p in pairs])
        expected = ex.Extractor(lm, sae, HookPoint(2), batch_size=3).dense([p.b for p in whole])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_shared_prefix_falls_back_to_whole_inputs_at_layer_0_input(model_dirs):
    """Reading layer 0's input runs no layer, so nothing is cached: the engine encodes prefix
    and question together instead (GPT-2's learned positions would otherwise restart at 0)."""
    from .conftest import make_sae

    lm = load_model(str(model_dirs["gpt2"]))
    sae = make_sae("standard", hook="blocks.0.hook_resid_pre")
    sae_dir = model_dirs["gpt2"].parent / "sae-pre0"
    sae.save_model(sae_dir)
    engine = ex.Extractor(lm, load_sae(str(sae_dir)), HookPoint(0, "pre"), batch_size=2)
    demos = {"all": (Example("What is 2 + 3?", "Add them: 5.", None, "d0"),)}
    qs = [Example(t, None, None, str(i)) for i, t in enumerate(CORPUS[:3])]  # unlabelled: one domain
    pairs = list(domain_icl_pairs(qs, demos, lm.tokenizer, Render(with_response=False, tokens="all")))
    assert all(p.b.prefix for p in pairs)
    got = engine.dense([p.b for p in pairs])
    expected = engine.dense([ex._whole(p.b) for p in pairs])
    torch.testing.assert_close(got, expected)


def test_per_example_shifts_add_up_to_the_shift_and_survive_save(tmp_path, model_dirs, sae_dirs):
    sae = load_sae(str(sae_dirs["topk"]))
    engine = ex.Extractor(load_model(str(model_dirs["llama"])), sae, parse_hook_name(sae.hook_name), 2)
    exs = [Example(f"What is {i} plus {i}?", f"It is {2 * i}.", None, str(i)) for i in range(5)]
    stats = ex.shift_stats(engine, "icl", exs, Render(chat=True, tokens="response"), demos=2)["sae"]
    per = stats.example_shift(list(range(sae.d_sae)))
    assert per.shape == (5, sae.d_sae) and (per.sum(1) > 0).all()
    assert torch.allclose(per.sum(0), stats.sum_sq_diff, rtol=1e-5, atol=1e-6)
    stats.save(tmp_path / "s.safetensors")
    back = load_stats(tmp_path / "s.safetensors")
    assert torch.equal(back.example_shift([3, 1]), per[:, [3, 1]])

# --- `sts extract` ----------------------------------------------------------------------------

def test_extract_pt_matches_per_record_features_and_scores_like_paper(tmp_path, run_cli, model_dirs,
                                                                     sae_dirs, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "feats.pt"
    argv = ["extract", "--model", str(model_dirs["gpt2"]), "--sae", str(sae_dirs["jumprelu"]),
            "--data", str(text_file), "--format", "pt", "--out", str(out), "--max-tokens", "40",
            "--batch-size", "3"]
    run_cli(argv)
    feats = torch.load(out)
    assert feats.dtype == torch.float32 and feats.shape == (40, 96)
    tok = AutoTokenizer.from_pretrained(model_dirs["gpt2"])
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"]).eval()
    sae = SAE.load_from_disk(sae_dirs["jumprelu"])
    rows = []
    for text in CORPUS:  # tokens exactly tokenizer(text)["input_ids"], records in order
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            rows.append(sae.encode(model(ids, output_hidden_states=True).hidden_states[3][0]))
    torch.testing.assert_close(feats, torch.cat(rows)[:40], rtol=1e-5, atol=1e-5)


def test_sft_shift_compares_two_models_on_identical_tokens(tmp_path, run_cli, model_dirs, sae_dirs, qa_file):
    from .conftest import make_model, make_tokenizer

    tuned = tmp_path / "tuned"
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    with torch.no_grad():  # a "fine-tuned" model: the same weights, layer 1 nudged
        for p in model.model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["standard"]), "--data", str(qa_file)]
    same, moved = tmp_path / "same.safetensors", tmp_path / "moved.safetensors"
    run_cli(["extract", *common, "--shift", "sft", "--tuned-model", str(model_dirs["llama"]),
            "--out", str(same)])
    run_cli(["extract", *common, "--shift", "sft", "--tuned-model", str(tuned), "--out", str(moved)])

    s, m = load_stats(same), load_stats(moved)
    assert s.a.count == m.a.count > 0 and s.meta["shift"] == "sft"
    assert float(s.sum_sq_diff.max()) == 0.0  # the same model on the same tokens: no shift
    assert float(m.sum_sq_diff.max()) > 0.0
    torch.testing.assert_close(m.a.sum_sq, s.a.sum_sq)  # side a is the base model either way


def test_paper_shift_from_datasets_equals_dense_extraction(tmp_path, run_cli, model_dirs, sae_dirs,
                                                           qa_file):
    """`sts extract --shift paper` on a dataset == the reference formula on the two dense streams."""
    out = tmp_path / "paper.safetensors"
    run_cli(["extract", "--model", str(model_dirs["qwen2"]), "--sae", str(sae_dirs["topk"]),
            "--data", str(qa_file), "--shift", "paper", "--max-tokens", "60", "--out", str(out)])
    got = load_stats(out)
    lm = load_model(str(model_dirs["qwen2"]))
    engine = ex.Extractor(lm, load_sae(str(sae_dirs["topk"])), HookPoint(2))
    examples = load_dataset(str(qa_file)).examples
    render = Render(chat=False, with_response=True, tokens="all")
    base = engine.dense(sequences(examples, lm.tokenizer, render))
    shifted = engine.dense(icl_sequences(examples, lm.tokenizer, render, 2, 0))
    assert got.a.count == 60
    torch.testing.assert_close(got.sum_sq_diff, ((shifted[:60].double() - base[:60].double()) ** 2).sum(0),
                               rtol=1e-5, atol=1e-6)
