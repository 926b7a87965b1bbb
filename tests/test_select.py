"""Issue 54, `sts select`: its order is a ranking by hand of each example's term of `grad`
(autograd gradients through the same sketch), duplicates are scored once and never chosen twice, a
resumed run gives an uninterrupted run's scores, and bad input fails in one line with nothing written."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from sts.data.datasets import load_dataset
from sts.engine.gradients import adapted, domain_side, indexed_training_items, sketch
from sts.engine.models import load_model
from sts.engine.pool import fold
from sts.engine.settings import FinetuneSpec
from tests.conftest import QA_RECORDS, write_jsonl
from tests.test_gradients import _grad, _hf_loss

DIM, BIG = 1024, 1 << 16


@pytest.fixture
def pool(tmp_path):
    """The QA records, the third one twice (an exact duplicate), as a .json array."""
    records = [*QA_RECORDS, QA_RECORDS[2]]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(records))
    return path, records


@pytest.fixture
def sae(sae_dirs):
    return sae_dirs["topk"]


def _argv(model_dirs, pool_path, domain_file, out, *more, sae=None):
    return ["select", "--model", str(model_dirs["llama"]), "--sae", str(sae), "--train", str(pool_path),
            "--domains", str(domain_file), "--dim", str(DIM), "--out", str(out), *more]


def _by_hand(model_dirs, pool_path, domain_file, targets) -> tuple[list[float], list[float]]:
    """Each distinct example's t_i <fold S g_i, sum_D fold S g_D> / T, its row rounded to float16 as
    stored; and the most that storing can move it: a row's element computed by another order of the
    same float32 sums may round to the neighbouring float16, one ulp (at most 2^-10 of it) away."""
    lm = load_model(str(model_dirs["llama"]))
    spec = FinetuneSpec(seed=0)
    model = adapted(lm, spec)
    examples = load_dataset(str(pool_path)).examples[:5]  # the sixth is the duplicate
    domains = load_dataset(str(domain_file)).by_domain()
    side = domain_side(lm, model, {t: domains[t] for t in targets})
    target = sum(fold(sketch(side.domains[t], BIG), DIM) for t in targets)
    indexed = indexed_training_items(lm, examples, spec)
    rows = {}
    for pos, (ids, start) in indexed:  # stored as the row over its largest magnitude, in float16
        row = fold(sketch(_grad(model, _hf_loss(model, ids, start)), BIG), DIM)
        scale = row.abs().max().float().double()
        rows[pos] = (row / scale).to(torch.float16).double() * scale
    tokens = {pos: len(ids) - start for pos, (ids, start) in indexed}
    total = sum(tokens.values())
    scores = [float(rows[i] @ target) * tokens[i] / total for i in range(5)]
    bounds = [2 ** -10 * float(rows[i].abs() @ target.abs()) * tokens[i] / total for i in range(5)]
    return scores, bounds


def test_select_chooses_by_each_examples_grad_term_as_computed_by_hand(run_cli, tmp_path, model_dirs, sae, pool,
                                                                       domain_file, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    pool_path, records = pool
    out = tmp_path / "chosen.json"
    argv = _argv(model_dirs, pool_path, domain_file, out, "--target", "math,law", "--count", "3", sae=sae)
    printed = run_cli(argv).out
    want, bounds = _by_hand(model_dirs, pool_path, domain_file, ["math", "law"])
    with open(str(out) + ".scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = [float(r["score"]) for r in rows]
    assert all(abs(g - w) <= b for g, w, b in zip(got, want, bounds)), (got, want, bounds)
    assert all(abs(a - b) > ba + bb for a, b, ba, bb in zip(want, want[1:], bounds, bounds[1:]))  # an order to check
    assert got[5] == got[2] and rows[5]["duplicate_of"] == "2" and rows[5]["chosen"] == ""
    order = sorted(range(5), key=lambda i: (-want[i], i))[:3]
    assert [int(r["position"]) for r in sorted((r for r in rows if r["chosen"]), key=lambda r: int(r["chosen"]))] \
        == order
    # the chosen records, as the pool holds them, in the pool's order
    assert json.loads(out.read_text()) == [records[i] for i in sorted(order)]
    assert f"#{order[0]} " in printed.splitlines()[1]


def test_a_resumed_run_gives_the_uninterrupted_scores(run_cli, tmp_path, model_dirs, sae, pool, domain_file,
                                                      monkeypatch):
    """A run stopped after some examples (their done flags set, the rest never written, as after
    kill -9) recomputes only the rest, and its scores equal an uninterrupted run's."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    pool_path, _ = pool
    argv = _argv(model_dirs, pool_path, domain_file, tmp_path / "a.jsonl", "--target", "biology", "--fraction", "0.4",
                 sae=sae)
    first = run_cli(argv)
    store = next((tmp_path / "cache" / "select").iterdir())
    done = np.load(store / "done.u8.npy", mmap_mode="r+")
    rows = np.load(store / "rows.f16.npy", mmap_mode="r+")
    done[[1, 3]] = 0  # as if killed before these were flushed: garbage in their rows
    rows[[1, 3]] = 7.0
    done.flush()
    rows.flush()
    again = run_cli([*argv[:-6], "--out", str(tmp_path / "b.jsonl"), *argv[-4:]])
    assert "(3 of 5 done before)" in again.err and "(0 of 5 done before)" in first.err
    assert (tmp_path / "a.jsonl.scores.csv").read_text() == (tmp_path / "b.jsonl.scores.csv").read_text()
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2  # 40% of the 5 distinct examples
    assert "chose 2 of 6" in first.out
    # another --dim is another store (the same pool and model): computed anew, not refused
    other = run_cli([*argv[:-6], "--dim", "2048", "--out", str(tmp_path / "c.jsonl"), *argv[-4:]])
    assert "(0 of 5 done before)" in other.err and len(list((tmp_path / "cache" / "select").iterdir())) == 2


@pytest.mark.parametrize("more,needle", [
    (["--target", "chemistry", "--count", "2"], "not among the domains"),
    (["--target", "math", "--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["--target", "math", "--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--target", "math", "--count", "6"], "more than the pool's 5 distinct usable examples"),
    (["--target", "math"], "give one of --fraction"),
    (["--target", "math", "--count", "2", "--dim", "1000"], "--dim must divide"),
    (["--target", "math", "--count", "2", "--out", "POOL"], "is the pool itself"),
])
def test_bad_input_fails_in_one_line_and_writes_nothing(cli_fails, tmp_path, model_dirs, sae, pool, domain_file,
                                                        monkeypatch, more, needle):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    pool_path, _ = pool
    argv = _argv(model_dirs, pool_path, domain_file, tmp_path / "s.jsonl", *more, sae=sae)
    if "--dim" in more:
        argv = argv[:argv.index("--dim")] + argv[argv.index("--dim") + 2:]
    if "POOL" in more:  # --out naming the pool: given last, it is the one taken
        argv = [str(pool_path) if a == "POOL" else a for a in argv]
    cli_fails(argv, needle, out=tmp_path / "s.jsonl")
    assert not (tmp_path / "s.jsonl.scores.csv").exists()


def test_a_pool_with_no_usable_example_is_refused(cli_fails, tmp_path, model_dirs, sae, domain_file, monkeypatch):
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "a question", "output": " "}])
    cli_fails(_argv(model_dirs, empty, domain_file, tmp_path / "s.jsonl", "--target", "math", "--count", "1", sae=sae),
              "no example has a response", out=tmp_path / "s.jsonl")


def test_a_folded_sketch_is_the_count_sketch_of_the_buckets_modulo_the_smaller_dimension():
    """Folding the shipped sketch (bucket b + k*dim summed into b) is exactly the count sketch whose
    hash is the shipped one modulo dim, with the same signs: an unbiased estimate of every inner
    product, so the pool's rows and the shipped domain sides meet in the folded space."""
    from sts.engine.gradients import _sketch_map

    x = torch.randn(5000, dtype=torch.float64)
    buckets, signs = _sketch_map(5000, BIG, 0)
    by_hand = torch.zeros(DIM, dtype=torch.float64).index_add_(0, buckets % DIM, x * signs)
    assert torch.allclose(fold(sketch(x, BIG), DIM), by_hand, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="divisor"):
        fold(sketch(x, BIG), 1000)
