"""Many processes, one answer (issue 43): two processes with gloo on the CPU, each reading its share
of the training examples and domain records, reduce to the same gradient sides (G, v, counts and
each domain's mean gradient) and the same SAE statistics as one process, with uneven shards and
a shard with no record."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from sts.data.datasets import load_dataset
from sts.engine.distributed import World, shard, world
from sts.engine.gradients import adapted, domain_gradients, training_gradients
from sts.engine.models import load_model
from sts.engine.settings import FinetuneSpec

SPEC = FinetuneSpec(lora_r=4, seed=3)


def _sides(model_dir: str, qa: str, domains_file: str) -> dict[str, object]:
    lm = load_model(model_dir)
    train = load_dataset(qa).examples  # 5 examples: 3 and 2 over two processes
    domains = load_dataset(domains_file).by_domain()  # 3 records a domain: 2 and 1
    domains["solo"] = domains[next(iter(domains))][:1]  # 1 record: the second process reads none
    model = adapted(lm, SPEC)
    g, v, examples, tokens = training_gradients(lm, model, train, SPEC)
    sides, records = domain_gradients(lm, model, domains, batch_tokens=64)
    return {"g": g, "v": v, "examples": examples, "tokens": tokens, "sides": sides, "records": records,
            "world": world()}


def _worker(rank: int, size: int, rendezvous: str, out: str, args: tuple[str, str, str]) -> None:
    import torch.distributed as dist

    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    try:
        torch.save(_sides(*args), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _sae_statistics(model_dir: str, sae_dir: str, qa: str) -> dict[str, object]:
    """Every Extractor pass a prediction reads, under whatever process group is joined: a domain's
    statistics (both readouts, a token budget that cuts an example), the icl shift with each
    example's own entries, the data shift's per-example means, the dense export and the top
    contexts of the explanation."""
    from sts.data.inputs import domain_render, sequences, training_render
    from sts.engine.extract import Extractor, shift_stats
    from sts.engine.models import parse_hook_name
    from sts.engine.saes import load_sae
    from sts.prediction.predict import top_contexts

    lm, sae = load_model(model_dir), load_sae(sae_dir)
    engine = Extractor(lm, sae, parse_hook_name(sae.hook_name), batch_size=2, world=world())
    examples = load_dataset(qa).examples  # 5: 3 and 2 over two processes
    seqs = list(sequences(examples, lm.tokenizer, domain_render(False)))
    budget = sum(len(s.positions) for s in seqs[:3]) - 2  # the budget cuts the third sequence
    stats = engine.stats_many(seqs, ("sae", "raw"), max_tokens=budget)
    shift = shift_stats(engine, "icl", examples, training_render("icl"), demos=1, readouts=("sae",))["sae"]
    means, counts = engine.example_means(seqs, ("sae",))
    solo = engine.stats_many(seqs[:1], ("sae",))["sae"]  # one sequence: the second process reads none
    fires = [int(j) for j in stats["sae"].fires.argsort(descending=True)[:3]]
    share = sum(len(batch) for _, batch in engine.batches(seqs, len(seqs), "share"))
    return {"share": share, "stats": stats, "shift": shift, "means": means, "counts": counts, "solo": solo,
            "dense": engine.dense(seqs), "contexts": top_contexts(engine, seqs, fires, 3, lm.tokenizer)}


def _statistics_worker(rank: int, size: int, rendezvous: str, out: str, args: tuple[str, str, str]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    try:
        torch.save(_sae_statistics(*args), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _same_stats(got, want) -> None:
    assert got.count == want.count and torch.equal(got.fires, want.fires)
    assert torch.allclose(got.sum, want.sum, rtol=1e-6, atol=1e-9)
    assert torch.allclose(got.sum_sq, want.sum_sq, rtol=1e-6, atol=1e-9)


def test_two_processes_give_one_process_sae_statistics(model_dirs, sae_dirs, qa_file, tmp_path):
    args = (str(model_dirs["llama"]), str(sae_dirs["topk"]), str(qa_file))
    one = _sae_statistics(*args)
    assert one["stats"]["sae"].count > 0 and one["shift"].per_example is not None
    out = tmp_path / "stats"
    mp.spawn(_statistics_worker, args=(2, str(tmp_path / "rendezvous"), str(out), args), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(Path(f"{out}.{rank}"), weights_only=False)
        assert (got["share"], one["share"]) == ([3, 2][rank], 5)  # each read its share, not the whole
        for r in ("sae", "raw"):
            _same_stats(got["stats"][r], one["stats"][r])
        _same_stats(got["solo"], one["solo"])
        _same_stats(got["shift"].a, one["shift"].a)
        _same_stats(got["shift"].b, one["shift"].b)
        assert torch.allclose(got["shift"].sum_sq_diff, one["shift"].sum_sq_diff, rtol=1e-6, atol=1e-9)
        mine, theirs = got["shift"].per_example, one["shift"].per_example
        assert mine.examples == theirs.examples
        assert torch.equal(mine.rows, theirs.rows) and torch.equal(mine.cols, theirs.cols)
        assert torch.allclose(mine.values, theirs.values, rtol=1e-6, atol=1e-9)
        assert got["counts"] == one["counts"] and torch.allclose(got["means"]["sae"], one["means"]["sae"], atol=1e-6)
        assert torch.allclose(got["dense"], one["dense"], atol=1e-6)
        assert got["contexts"] == one["contexts"]


def _too_long_worker(rank: int, size: int, rendezvous: str, out: str, args: tuple[str, str]) -> None:
    import torch.distributed as dist

    from sts.data.inputs import ModelInput
    from sts.engine.extract import Extractor
    from sts.engine.models import parse_hook_name
    from sts.engine.saes import load_sae
    from sts.errors import UserError

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    lm, sae = load_model(args[0]), load_sae(args[1])
    lm.model.config.max_position_embeddings = 20
    engine = Extractor(lm, sae, parse_hook_name(sae.hook_name), world=world())
    seqs = [ModelInput([5] * 6, [5]), ModelInput([6] * 7, [6]), ModelInput([7] * 40, [39])]  # shares: [0, 2], [1]
    try:
        engine.stats_many(seqs, ("sae",))
        Path(f"{out}.{rank}").write_text("read")
    except UserError as exc:
        Path(f"{out}.{rank}").write_text(str(exc))
    finally:
        dist.destroy_process_group()


def test_an_input_too_long_is_refused_in_every_process(model_dirs, sae_dirs, tmp_path):
    """Only one process's share holds the input longer than the model's positions: both refuse it
    (one process alone, with its error swallowed where the explanation is optional, would leave the
    other waiting in a collective)."""
    out = tmp_path / "said"
    ctx = mp.start_processes(_too_long_worker, args=(2, str(tmp_path / "rendezvous"), str(out),
                                                     (str(model_dirs["llama"]), str(sae_dirs["topk"]))),
                             nprocs=2, join=False)
    for _ in range(240):
        if ctx.join(timeout=1):
            break
    else:
        for proc in ctx.processes:
            proc.kill()
        raise AssertionError("the processes did not finish: one waits in a collective")
    for rank in range(2):
        assert "longer than" in Path(f"{out}.{rank}").read_text()


def test_shards_interleave_and_may_be_empty():
    items = list(range(5))
    assert [shard(items, World(r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert shard([7], World(1, 2)) == [] and shard(items, World()) == items
    assert World(0, 2).describe() == "2 processes" and world() == World()


def test_two_processes_give_one_process_gradient_sides(model_dirs, qa_file, domain_file, tmp_path):
    args = (str(model_dirs["llama"]), str(qa_file), str(domain_file))
    one = _sides(*args)
    out = tmp_path / "sides"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(out), args), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(Path(f"{out}.{rank}"), weights_only=False)
        assert got["world"] == World(rank, 2)
        assert (got["examples"], got["tokens"], got["records"]) == (one["examples"], one["tokens"], one["records"])
        assert torch.allclose(got["g"], one["g"], atol=1e-7, rtol=1e-5) and one["g"].abs().sum() > 0
        assert torch.allclose(got["v"], one["v"], atol=1e-9, rtol=1e-5)
        for name, side in one["sides"].items():
            assert torch.allclose(got["sides"][name], side, atol=1e-7, rtol=1e-5), name


def test_torchrun_predict_gives_one_process_scores_and_writes_once(model_dirs, sae_dirs, qa_file, domain_file,
                                                                     tmp_path):
    """`torchrun --nproc-per-node 2 -m sts predict`: the plan line counts the processes, the
    main process writes the report and the cache, and the scores are one process's (with the SAE's
    explanation, whose statistics the processes share too)."""
    import json
    import os
    import subprocess
    import sys

    argv = ["predict", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
            "--domains", str(domain_file), "--score", "grad-adam", "--gradient-sketch", "0"]
    env = os.environ | {"STS_CACHE": str(tmp_path / "cache-1")}
    one = subprocess.run([sys.executable, "-m", "sts", *argv, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    env = os.environ | {"STS_CACHE": str(tmp_path / "cache-2"), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "sts", *argv, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "in each of 2 processes" in two.stderr and two.stderr.count("sts: to compute") == 1, two.stderr[-3000:]
    got, want = (json.loads((tmp_path / d / "sts.json").read_text()) for d in ("two", "one"))
    assert got["scores"].keys() == want["scores"].keys()
    for d, s in want["scores"].items():
        assert abs(got["scores"][d] - s) <= 1e-4 * abs(s) + 1e-9, (d, got["scores"][d], s)
    assert got["shifted_features"][:10] == want["shifted_features"][:10] and want["shifted_features"]
    assert [f["contexts"] for f in got["features"][:3]] == [f["contexts"] for f in want["features"][:3]]
    assert any(f["contexts"] for f in want["features"][:3])
    entries = sorted(p.name for p in (tmp_path / "cache-2").rglob("*") if p.is_file())
    assert entries == sorted(p.name for p in (tmp_path / "cache-1").rglob("*") if p.is_file())  # written once each


def test_torchrun_lookahead_scores_share_their_loss_passes(model_dirs, sae_dirs, qa_file, tmp_path):
    """`line` under torchrun (the processes share the domain losses' forward passes and the training
    gradients) gives one process's scores; `look` runs the trainer's data-parallel steps, which are
    another run's (their own entry in the cache), and still gives a score for every domain."""
    import json
    import os
    import subprocess
    import sys

    from tests.test_validation import _reference_file

    domains = str(_reference_file(tmp_path))  # records with reference chains of thought: line and look read them
    common = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa_file),
              "--domains", domains, "--steps", "2", "--no-explain"]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

    def predict(out: str, score: str, processes: list[str]) -> dict:
        env = os.environ | {"STS_CACHE": str(tmp_path / f"cache-{out}"), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, *processes, "-m", "sts", "predict", *common, "--score", score,
                               "--out", str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((tmp_path / out / "sts.json").read_text())["scores"]

    want, got = predict("one", "line", []), predict("two", "line", launcher)
    assert got.keys() == want.keys() and len(want) == 4
    for d, v in want.items():  # a drop is a difference of two float32 losses (~5): a few of their ulps apart
        assert abs(got[d] - v) <= 1e-4 * abs(v) + 2e-6, (d, got[d], v)
    look = predict("two", "look", launcher)
    assert look.keys() == want.keys() and all(v == v for v in look.values())


def test_a_process_that_fails_says_so_in_one_line_and_ends_the_run(tmp_path):
    import os
    import re
    import subprocess
    import sys

    env = os.environ | {"STS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sts", "predict", "--train", str(tmp_path / "missing.jsonl"), "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    lines = [line for line in done.stderr.splitlines() if line.startswith("sts: error")]
    assert 1 <= len(lines) <= 2, done.stderr[-2000:]  # one line a failing process (torchrun stops the rest)
    assert all(re.fullmatch(r"sts: error \(process [12] of 2\): dataset not found: .*", line) for line in lines), lines


def test_torchrun_finetune_trains_data_parallel_and_writes_once(model_dirs, qa_file, tmp_path):
    """`sts finetune` passes through to the trainer's own data parallelism (transformers/TRL under
    torchrun): the run's batch splits over the processes and the main process writes the model."""
    import json
    import os
    import subprocess
    import sys

    def finetune(out: str, batch: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "sts", "finetune", "--model", str(model_dirs["llama"]), "--train",
                               str(qa_file), "--out", str(tmp_path / out), "--max-steps", "2", "--batch-size",
                               str(batch)], env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)

    done = finetune("tuned", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fine-tuned on 5 examples") == 1  # one report
    record = json.loads((tmp_path / "tuned" / "finetune.json").read_text())
    assert len(record["losses"]) == 2 and (tmp_path / "tuned" / "adapter").is_dir()
    assert not list(tmp_path.glob("*.part"))


def test_a_batch_that_does_not_split_over_the_processes_is_refused(model_dirs, monkeypatch, tmp_path):
    import pytest

    from sts.engine.finetuning import sft_args
    from sts.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process it starts
    lm = load_model(str(model_dirs["llama"]))
    with pytest.raises(UserError, match="does not split over 2 processes"):  # before the trainer starts
        sft_args(FinetuneSpec(batch_size=3), lm.model, tmp_path)


def test_torchrun_validate_shares_its_stages_and_writes_one_results_folder(model_dirs, sae_dirs, tmp_path):
    """`torchrun --nproc-per-node 2 -m sts validate`: every stage runs in both processes (the
    predictions' passes and the evaluations' questions shared, the fine-tuning data-parallel in the
    trainer), the main process writes the folder and reports once. The base evaluation and the
    prediction are one process's; the tuned model is not (the trainer's sampler orders the batches
    its own way), so neither is what it measures."""
    import csv
    import json
    import os
    import subprocess
    import sys

    from tests.test_validation import _domain_file, _reference_file

    domains, reference = _domain_file(tmp_path), _reference_file(tmp_path)
    argv = ["validate", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--domains", str(domains),
            "--train", f"{domains}#category=math", "--train", f"{domains}#category=law", "--max-train", "4",
            "--predict-examples", "5", "--k", "8", "--max-steps", "2", "--ft-batch-size", "2", "--replicates", "20",
            "--reference", str(reference), "--reference-examples", "3", "--metric", "cot_nll",
            "--no-question-evaluation", "--no-sft-shift", "--gradients"]

    def run(out: str, launcher: list[str]) -> subprocess.CompletedProcess[str]:
        env = os.environ | {"STS_CACHE": str(tmp_path / f"cache-{out}"), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, *launcher, "-m", "sts", *argv, "--out", str(tmp_path / out)],
                              env=env, capture_output=True, text=True, timeout=900)

    one = run("one", [])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run("two", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("swap test") == 1, two.stdout[-2000:]
    assert two.stderr.count("results.json, correlations.csv") == 1
    assert two.stderr.count("[validate] correlations") == 1  # one account of the run
    assert {p.name for p in (tmp_path / "two" / "stages").iterdir()} == {
        p.name for p in (tmp_path / "one" / "stages").iterdir()}
    assert json.loads((tmp_path / "two" / "results.json").read_text())["swap"]

    def base(out: str) -> dict[str, float]:
        with open(tmp_path / out / "eval-base-reference" / "predictions.csv") as fh:
            return {r["question_id"]: float(r["cot_nll"]) for r in csv.DictReader(fh)}

    want, got = base("one"), base("two")
    assert list(got) == list(want) and len(want) == 12  # every question once, in one process's order
    assert all(abs(got[q] - want[q]) <= 1e-5 * abs(want[q]) for q in want)
    for s in ("train-1-d-math", "train-2-d-law"):
        mine, theirs = (json.loads((tmp_path / o / s / "scores-icl.json").read_text())["scores"]
                        for o in ("two", "one"))
        for score, by_domain in theirs.items():
            for d, v in by_domain.items():
                assert abs(mine[score][d] - v) <= 1e-4 * abs(v) + 1e-9, (s, score, d)
