"""The gradient scores on a tiny model: `grad` is the inner product of two gradients computed
directly with autograd, `grad-adam`'s preconditioner is the per-example mean square, and
`sts predict --score grad` runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sts.data.datasets import load_dataset
from sts.engine.gradients import (
    EPS,
    DomainGradients,
    GradientStats,
    TrainingGradients,
    adapted,
    domain_items,
    first_update,
    gradient_stats,
    sketch,
    training_items,
)
from sts.engine.models import load_model
from sts.engine.settings import FinetuneSpec
from tests.tolerance import TINY_FORWARD, assert_same_reduction


def _grad(model, loss) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def _hf_loss(model, ids: list[int], start: int) -> torch.Tensor:
    """transformers' own loss: mean NLL over the labelled tokens (labels -100 before `start`)."""
    labels = torch.tensor([[-100] * start + ids[start:]])
    return model(input_ids=torch.tensor([ids]), labels=labels).loss


@pytest.fixture
def setup(model_dirs, qa_file, domain_file):
    lm = load_model(str(model_dirs["llama"]))
    train = load_dataset(str(qa_file)).examples
    domains = load_dataset(str(domain_file)).by_domain()
    return lm, train, domains


def test_grad_is_the_inner_product_of_the_two_gradients(setup):
    lm, train, domains = setup
    spec = FinetuneSpec(lora_r=4, seed=3)
    stats = gradient_stats(lm, train, domains, spec, batch_tokens=64)  # several batches per domain
    model = adapted(lm, spec)
    items = training_items(lm, train, spec)
    # the training loss over every response token at once (token-weighted, as the trainer's batch loss)
    total = sum(len(ids) - start for ids, start in items)
    loss = sum(_hf_loss(model, ids, start) * (len(ids) - start) for ids, start in items) / total
    g_train = _grad(model, loss)
    assert torch.allclose(stats.train_mean, g_train, atol=1e-6, rtol=1e-4)
    assert g_train.abs().sum() > 0
    for name, exs in domains.items():
        d_items = domain_items(lm, exs)
        g_domain = _grad(model, sum(_hf_loss(model, ids, start) for ids, start in d_items) / len(d_items))
        assert torch.allclose(stats.domains[name], g_domain, atol=1e-6, rtol=1e-4)
        assert stats.scores(adam=False)[name] == pytest.approx(float(g_train.double() @ g_domain.double()), rel=1e-4)
    assert stats.records == {d: 3 for d in domains} and stats.examples == len(items) == 5


def test_the_content_domain_side_leaves_the_templated_opening_out(setup):
    """cot_nll_content's domain side: the loss over the reference's tokens after "Let's think
    step by step." (and the Wikipedia sentence where there is one), the opening read as context;
    records without a reference keep their answer text's loss."""
    from sts.data.examples import Example
    from sts.engine.gradients import domain_gradients

    lm, _, _ = setup
    cots = {"law": "Let's think step by step. We refer to Wikipedia articles on law for help. It is A. The "
                   "answer is (A).", "math": "Let's think step by step. Two and two is four. The answer is (B)."}
    domains = {d: [Example(f"Question {i} on {d}?", None, d, f"{d}{i}", choices=("yes", "no"), answer="A",
                           cot=cot if i < 2 else None) for i in range(3)] for d, cot in cots.items()}
    spec = FinetuneSpec(lora_r=4, seed=1)
    model = adapted(lm, spec)
    whole, content = (domain_items(lm, domains["law"], c) for c in (False, True))
    opening = lm.tokenizer("Let's think step by step. We refer to Wikipedia articles on law for help.",
                           add_special_tokens=False)["input_ids"]
    for (ids, a), (ids2, b) in zip(whole[:2], content[:2]):  # the references: the opening moved into the context
        assert ids == ids2 and b - a == len(opening) and ids[a:b] == opening
    assert whole[2] == content[2]  # no reference: the answer text, unchanged
    grads, records = domain_gradients(lm, model, domains, batch_tokens=64, content=True)
    for d, exs in domains.items():
        items = domain_items(lm, exs, True)
        direct = _grad(model, sum(_hf_loss(model, ids, start) for ids, start in items) / len(items))
        assert torch.allclose(grads[d], direct, atol=1e-6, rtol=1e-4) and records[d] == 3
    assert not torch.allclose(grads["law"], domain_gradients(lm, model, domains, batch_tokens=64)[0]["law"])


def test_grad_adam_divides_by_the_root_mean_square_over_examples(setup):
    lm, train, domains = setup
    spec = FinetuneSpec(lora_r=4)
    stats = gradient_stats(lm, train, domains, spec)
    model = adapted(lm, spec)
    per_example = torch.stack([_grad(model, _hf_loss(model, ids, start))
                               for ids, start in training_items(lm, train, spec)])
    v = (per_example ** 2).mean(0)
    assert torch.allclose(stats.train_sq, v, atol=1e-9, rtol=1e-4)
    u = stats.train_mean.double() / (v.double() + EPS).sqrt()
    for name, g in stats.domains.items():
        assert stats.scores(adam=True)[name] == pytest.approx(float(u @ g.double()), rel=1e-4)
    # the A matrices have no gradient at the first step (B = 0): Adam leaves them where they are
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    a_parts = torch.split(stats.train_mean, sizes)
    assert all(float(part.abs().sum()) == 0 for n, part in zip(names, a_parts) if "lora_A" in n)


def test_sts_predict_score_grad_runs_and_caches(run_cli, tmp_path, model_dirs, sae_dirs, qa_file, domain_file,
                                                monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    argv = ["predict", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
            "--domains", str(domain_file), "--score", "grad-adam", "--out", str(tmp_path / "out")]
    first = run_cli(argv)
    result = json.loads((tmp_path / "out" / "sts.json").read_text())
    assert result["score"] == "grad-adam" and {r["domain"] for r in result["ranking"]} == {"math", "law", "biology"}
    assert "gradients: 5 training examples" in first.err
    again = run_cli(argv)
    assert "gradients:" not in again.err  # read from the cache
    assert json.loads((tmp_path / "out" / "sts.json").read_text())["ranking"] == result["ranking"]


def test_a_second_training_set_reuses_the_domain_side(run_cli, tmp_path, model_dirs, sae_dirs, qa_file, domain_file,
                                                      monkeypatch):
    """The domains' gradients do not depend on the training set: cached apart, a second set costs
    its own backward passes only, and its scores equal a direct computation."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    lines = qa_file.read_text().splitlines()
    second = tmp_path / "second.jsonl"
    second.write_text("\n".join(lines[:3]) + "\n")
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--domains", str(domain_file),
              "--score", "grad", "--gradient-sketch", "0"]
    first = run_cli(["predict", "--train", str(qa_file), "--out", str(tmp_path / "a"), *common])
    assert first.err.count("domain records") == 3  # one cache entry a domain
    again = run_cli(["predict", "--train", str(second), "--out", str(tmp_path / "b"), *common])
    assert "gradients: 3 training examples" in again.err and "domain records" not in again.err
    got = json.loads((tmp_path / "b" / "sts.json").read_text())["scores"]
    lm = load_model(str(model_dirs["llama"]))
    direct = gradient_stats(lm, load_dataset(str(second)).examples, load_dataset(str(domain_file)).by_domain(),
                            FinetuneSpec()).scores(adam=False)
    assert got == pytest.approx(direct, rel=1e-4)


def test_the_count_sketch_is_linear_and_keeps_inner_products():
    """<S x, S y> estimates <x, y> with an error of about |x| |y| / sqrt(dim) (LESS's projection
    does the same job); S is linear and one fixed map (a seed), so both sides can be sketched apart."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300_000, generator=gen, dtype=torch.float64)
    y = 0.3 * x + torch.randn(300_000, generator=gen, dtype=torch.float64)  # cosine about 0.29
    dim = 1 << 16
    sx, sy = sketch(x, dim), sketch(y, dim)
    exact = float(x.double() @ y.double())
    bound = 4 * float(x.norm() * y.norm()) / dim ** 0.5
    assert abs(float(sx @ sy) - exact) < bound and bound < 0.1 * exact
    assert torch.allclose(sketch(2 * x - y, dim), 2 * sx - sy, atol=1e-9)
    assert torch.equal(sketch(x, dim), sx) and not torch.equal(sketch(x, dim, seed=1), sx)


def test_sketched_scores_are_the_sketches_inner_products_and_need_only_the_sketched_side(
        run_cli, tmp_path, model_dirs, sae_dirs, qa_file, domain_file, monkeypatch):
    """The default sketch: scores are <S u, S g_D> of the exact sides; a domain whose sketched
    side alone is there (as a shipped one is) costs no backward pass."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
              "--domains", str(domain_file), "--no-explain", "--out", str(tmp_path / "out")]
    run_cli(["predict", *common, "--score", "grad-adam", "--gradient-sketch", "4096"])
    got = json.loads((tmp_path / "out" / "sts.json").read_text())["scores"]
    lm = load_model(str(model_dirs["llama"]))
    exact = gradient_stats(lm, load_dataset(str(qa_file)).examples, load_dataset(str(domain_file)).by_domain(),
                           FinetuneSpec())
    u = exact.train_mean.double() / (exact.train_sq.double() + EPS).sqrt()
    assert got == pytest.approx({d: float(sketch(u, 4096) @ sketch(g, 4096)) for d, g in exact.domains.items()},
                                rel=1e-5)
    assert GradientStats(exact.train_mean, exact.train_sq, 5, 1, {d: sketch(g, 4096).float()
                                                                   for d, g in exact.domains.items()},
                         exact.records, 4096).scores(adam=True) == pytest.approx(got, rel=1e-5)
    removed = []
    for path in (tmp_path / "cache" / "extract").glob("*.safetensors"):  # the exact sides go, both of them
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format", "").startswith("sts-gradients-") and meta.get("sketch") == "0":
            path.unlink()
            removed.append(meta["format"])
    assert sorted(removed) == ["sts-gradients-domains/1"] * 3 + ["sts-gradients-train/1"]
    for score in ("grad-adam", "grad", "grad-sign"):  # the sketched training side holds every direction
        again = run_cli(["predict", *common, "--score", score, "--gradient-sketch", "4096"])
        assert "domain records" not in again.err and "training examples" not in again.err
        assert "no model pass" in again.err
        u = {"grad-adam": None, "grad": exact.train_mean, "grad-sign": first_update(exact.train_mean)}[score]
        want = got if u is None else {d: float(sketch(u, 4096) @ sketch(g, 4096)) for d, g in exact.domains.items()}
        assert json.loads((tmp_path / "out" / "sts.json").read_text())["scores"] == pytest.approx(want, rel=1e-5)
    # a mixture cannot be made from sketched training sides (v mixes, S(G / sqrt(v)) does not)
    part = TrainingGradients(exact.train_mean, exact.train_sq, 5, 10).sketched(4096)
    sides = DomainGradients(exact.domains, exact.records).sketched(4096)
    with pytest.raises(ValueError, match="exact training sides"):
        GradientStats.mixed([(GradientStats.join(part, sides), 0.5), (GradientStats.join(part, sides), 0.5)])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_training_gradients_equal_one_example_at_a_time(model_dirs, qa_file, domain_file, family):
    """The training side reads several examples per backward pass and recovers each one's own
    gradient (per-example hooks): G and v equal a loop of one backward pass per example, for any
    batching (one example a batch, several with padding, all in one)."""
    from sts.engine.gradients import training_gradients

    lm = load_model(str(model_dirs[family]))
    train = load_dataset(str(qa_file)).examples
    spec = FinetuneSpec(lora_r=4, seed=7)
    model = adapted(lm, spec)
    items = training_items(lm, train, spec)
    per_example = torch.stack([_grad(model, _hf_loss(model, ids, start)) for ids, start in items])
    counts = torch.tensor([float(len(ids) - start) for ids, start in items])
    g_ref, v_ref = (counts @ per_example) / counts.sum(), (per_example ** 2).mean(0)
    assert g_ref.abs().sum() > 0
    longest = max(len(ids) for ids, _ in items)
    for budget in (longest, 2 * longest + 1, 10_000):  # 1 a batch, 2 with padding, all 5 at once
        g, v, examples, tokens = training_gradients(lm, model, train, spec, batch_tokens=budget)
        assert examples == 5 and tokens == int(counts.sum())
        # another batching of a forward and a backward pass, then the mean over the examples' tokens
        assert_same_reduction(g, g_ref, length=2 * TINY_FORWARD + tokens)
        assert_same_reduction(v, v_ref, length=2 * TINY_FORWARD + tokens)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind on the adapter


def test_gradient_checkpointing_gives_the_same_gradients(model_dirs, qa_file, domain_file):
    """--gradient-checkpointing (for 7-9B models on a GPU) recomputes activations in the backward
    pass: G, v and the domain sides are unchanged, per-example hooks included."""
    lm = load_model(str(model_dirs["llama"]))
    train, domains = load_dataset(str(qa_file)).examples, load_dataset(str(domain_file)).by_domain()
    plain = gradient_stats(lm, train, domains, FinetuneSpec(lora_r=4, seed=2), batch_tokens=64)
    spec = FinetuneSpec(lora_r=4, seed=2, gradient_checkpointing=True)
    assert adapted(lm, spec).is_activation_checkpointing
    ckpt = gradient_stats(lm, train, domains, spec, batch_tokens=64)
    length = 2 * TINY_FORWARD + 64  # the recomputed forward pass, the backward pass, a batch's tokens
    assert_same_reduction(ckpt.train_mean, plain.train_mean, length=length)
    assert_same_reduction(ckpt.train_sq, plain.train_sq, length=length)
    for d in domains:
        assert_same_reduction(ckpt.domains[d], plain.domains[d], length=length)



def test_the_domain_side_reads_at_most_probe_records_a_domain(run_cli, cli_fails, tmp_path, model_dirs, sae_dirs,
                                                             qa_file, domain_file, monkeypatch):
    """A user's file of reference chains of thought with more records a domain than --probe-records:
    the domain side reads the seeded draw `sts validate` makes (the validated form's count), the
    plan line counts only those, and the scores equal a direct computation on the drawn records.
    A domain of plain questions (answer texts) is read whole."""
    from sts.data.references import draw

    from .conftest import write_jsonl

    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    refs = write_jsonl(tmp_path / "refs.jsonl", [
        {"question_id": f"{cat}{i}", "question": f"{cat} question {i}?", "options": ["yes", "no", "maybe"],
         "answer": "A", "answer_index": 0, "category": cat, "src": "t",
         "cot_content": f"A: Let's think step by step. {cat} {i} {'so ' * i}The answer is (A)."}
        for cat in ("math", "law") for i in range(4)])
    lm = load_model(str(model_dirs["llama"]))
    train = load_dataset(str(qa_file)).examples
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
              "--score", "grad", "--gradient-sketch", "0", "--no-explain"]
    got = run_cli(["predict", *common, "--domains", str(refs), "--probe-records", "2", "--out", str(tmp_path / "a")])
    assert "at most 2 records each" in got.err and got.err.count("gradients: 2 domain records") == 2
    scores = json.loads((tmp_path / "a" / "sts.json").read_text())["scores"]
    domains = load_dataset(str(refs)).by_domain()
    drawn = {d: draw(q, 2, 0, d) for d, q in domains.items()}
    assert scores == pytest.approx(gradient_stats(lm, train, drawn, FinetuneSpec()).scores(), rel=1e-4)
    everything = gradient_stats(lm, train, domains, FinetuneSpec()).scores()
    assert scores != pytest.approx(everything, rel=1e-4)  # the cut is real
    run_cli(["predict", *common, "--domains", str(refs), "--out", str(tmp_path / "b")])  # the default 10: all 4
    assert json.loads((tmp_path / "b" / "sts.json").read_text())["scores"] == pytest.approx(everything, rel=1e-4)
    # plain questions (no reference chain of thought): their answer texts are read whole
    plain = run_cli(["predict", *common, "--domains", str(domain_file), "--probe-records", "2",
                     "--out", str(tmp_path / "c")])
    assert plain.err.count("gradients: 3 domain records") == 3
    line = cli_fails(["predict", *common[:-5], "--domains", str(refs), "--score", "act", "--probe-records", "2"],
                     out=tmp_path / "d")
    assert "--probe-records" in line and "--score act" in line


def test_the_training_side_reads_the_first_gradient_examples(run_cli, cli_fails, tmp_path, model_dirs, sae_dirs,
                                                             qa_file, domain_file, monkeypatch):
    """--gradient-examples N: the training side is the first N examples' (docs/results/subset's rule),
    said in the plan line and the progress, and equal to a direct computation on them; the SAE
    explanation and --max-train are untouched."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
              "--domains", str(domain_file), "--score", "grad", "--gradient-sketch", "0"]
    got = run_cli(["predict", *common, "--gradient-examples", "3", "--out", str(tmp_path / "a")])
    plan = next(line for line in got.err.splitlines() if "to compute:" in line)
    assert "the gradients of 3 examples" in plan and "the shift of 5 examples" in plan
    assert "the first 3 of 5 training examples" in got.err
    scores = json.loads((tmp_path / "a" / "sts.json").read_text())["scores"]
    lm = load_model(str(model_dirs["llama"]))
    train = load_dataset(str(qa_file)).examples
    domains = load_dataset(str(domain_file)).by_domain()
    assert len(train) == 5
    assert scores == pytest.approx(gradient_stats(lm, train[:3], domains, FinetuneSpec()).scores(), rel=1e-4)
    whole = gradient_stats(lm, train, domains, FinetuneSpec()).scores()
    assert scores != pytest.approx(whole, rel=1e-4)
    run_cli(["predict", *common, "--gradient-examples", "0", "--out", str(tmp_path / "b")])
    assert json.loads((tmp_path / "b" / "sts.json").read_text())["scores"] == pytest.approx(whole, rel=1e-4)
    line = cli_fails(["predict", *common[:-4], "--score", "act", "--gradient-examples", "3"], out=tmp_path / "c")
    assert "--gradient-examples" in line and "--score act" in line


def test_the_loss_reads_the_lm_head_on_the_scored_positions_only_and_without_it_alike(model_dirs, qa_file):
    """`_loss` asks the model for the logits of the scored positions only (`logits_to_keep`); a model
    whose forward takes no such argument gets the head on every position and gives the same loss."""
    from sts.engine.gradients import _loss

    lm = load_model(str(model_dirs["llama"]))
    items = training_items(lm, load_dataset(str(qa_file)).examples, FinetuneSpec())[:3]
    assert min(start for _, start in items) > 1  # a context to leave out of the head

    class NoKeep(torch.nn.Module):  # a forward without logits_to_keep, as some remote-code models have
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask)

    pad = int(lm.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        kept = _loss(lm.model, items, [1.0, 0.5, 2.0], torch.device("cpu"), pad)
        whole = _loss(NoKeep(lm.model), items, [1.0, 0.5, 2.0], torch.device("cpu"), pad)
        direct = sum(w * _hf_loss(lm.model, ids, start) for w, (ids, start) in zip([1.0, 0.5, 2.0], items))
    assert_same_reduction(kept, whole, length=TINY_FORWARD)  # the head on other positions: another blocking
    assert_same_reduction(kept, direct, length=TINY_FORWARD)
