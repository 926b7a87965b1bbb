"""Many processes, one answer (issue 43): two processes with gloo on the CPU, each reading its share
of the training examples and domain records, reduce to the same gradient sides (G, v, counts and
each domain's mean gradient) and the same SAE statistics as one process, with uneven shards and
a shard with no record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from sts.data.datasets import load_dataset
from sts.engine.distributed import World, shard, world
from sts.engine.gradients import adapted, domain_gradients, training_gradients
from sts.engine.models import load_model
from sts.engine.settings import FinetuneSpec
from tests.conftest import DOMAIN_RECORDS, QA_RECORDS, built_once, write_jsonl
from tests.tolerance import LONGEST, TINY_FORWARD, TINY_LORA, assert_same_reduction

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


def _too_long(model_dir: str, sae_dir: str) -> str:
    """An input longer than the model's positions, in one process's share only: what this process says."""
    from sts.data.inputs import ModelInput
    from sts.engine.extract import Extractor
    from sts.engine.models import parse_hook_name
    from sts.engine.saes import load_sae
    from sts.errors import UserError

    lm, sae = load_model(model_dir), load_sae(sae_dir)
    lm.model.config.max_position_embeddings = 20
    engine = Extractor(lm, sae, parse_hook_name(sae.hook_name), world=world())
    seqs = [ModelInput([5] * 6, [5]), ModelInput([6] * 7, [6]), ModelInput([7] * 40, [39])]  # shares: [0, 2], [1]
    try:
        engine.stats_many(seqs, ("sae",))
        return "read"
    except UserError as exc:
        return str(exc)


def _group_worker(rank: int, size: int, rendezvous: str, out: str, args: tuple[str, str, str, str]) -> None:
    """One process of the group: every check's computation in turn under one process group (one
    spawn for all of them: a group costs seconds to start on two cores)."""
    import torch.distributed as dist

    model_dir, sae_dir, qa, domains = args
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    try:
        torch.manual_seed(0)
        torch.save({"sides": _sides(model_dir, qa, domains), "statistics": _sae_statistics(model_dir, sae_dir, qa)},
                   f"{out}.{rank}")
        Path(f"{out}.{rank}.too-long").write_text(_too_long(model_dir, sae_dir))
    finally:
        dist.destroy_process_group()


@dataclass
class TwoProcesses:
    one: dict[str, Any]  # one process's sides and statistics
    ranks: list[dict[str, Any]]  # each of two processes' (a process group over gloo)
    too_long: list[str]  # what each process said of the input too long for the model ("hung": it waited)


@pytest.fixture(scope="session")
def two_processes(model_dirs, sae_dirs, tmp_path_factory) -> TwoProcesses:
    from dataclasses import fields

    with built_once(tmp_path_factory, "two-processes") as (root, build):
        if build:
            got = _two_processes(model_dirs, sae_dirs, root)
            torch.save({f.name: getattr(got, f.name) for f in fields(got)}, root / "result.pt")
        return TwoProcesses(**torch.load(root / "result.pt", weights_only=False))


def _two_processes(model_dirs, sae_dirs, root: Path) -> TwoProcesses:
    qa, domains = write_jsonl(root / "train.jsonl", QA_RECORDS), write_jsonl(root / "domains.jsonl", DOMAIN_RECORDS)
    args = (str(model_dirs["llama"]), str(sae_dirs["topk"]), str(qa), str(domains))
    one = {"sides": _sides(args[0], args[2], args[3]), "statistics": _sae_statistics(*args[:3])}
    out = root / "got"
    ctx = mp.start_processes(_group_worker, args=(2, str(root / "rendezvous"), str(out), args), nprocs=2, join=False)
    for _ in range(300):
        if ctx.join(timeout=1):
            break
    else:  # one process waits in a collective the other never joins
        for proc in ctx.processes:
            proc.kill()
    said = [Path(f"{out}.{r}.too-long") for r in range(2)]
    return TwoProcesses(one, [torch.load(Path(f"{out}.{r}"), weights_only=False) for r in range(2)],
                        [p.read_text() if p.exists() else "hung" for p in said])


def _same_stats(got, want) -> None:
    """Sums over `want.count` tokens of features from the tiny model's forward pass, batched otherwise."""
    assert got.count == want.count and torch.equal(got.fires, want.fires)
    assert_same_reduction(got.sum, want.sum, length=TINY_FORWARD + want.count)
    assert_same_reduction(got.sum_sq, want.sum_sq, length=TINY_FORWARD + want.count)


def test_two_processes_give_one_process_sae_statistics(two_processes):
    one = two_processes.one["statistics"]
    assert one["stats"]["sae"].count > 0 and one["shift"].per_example is not None
    for rank, ranked in enumerate(two_processes.ranks):
        got = ranked["statistics"]
        assert (got["share"], one["share"]) == ([3, 2][rank], 5)  # each read its share, not the whole
        for r in ("sae", "raw"):
            _same_stats(got["stats"][r], one["stats"][r])
        _same_stats(got["solo"], one["solo"])
        _same_stats(got["shift"].a, one["shift"].a)
        _same_stats(got["shift"].b, one["shift"].b)
        tokens = one["shift"].a.count
        assert_same_reduction(got["shift"].sum_sq_diff, one["shift"].sum_sq_diff, length=TINY_FORWARD + tokens)
        mine, theirs = got["shift"].per_example, one["shift"].per_example
        assert mine.examples == theirs.examples
        assert torch.equal(mine.rows, theirs.rows) and torch.equal(mine.cols, theirs.cols)
        assert_same_reduction(mine.values, theirs.values, length=TINY_FORWARD + tokens)
        assert got["counts"] == one["counts"]
        assert_same_reduction(got["means"]["sae"], one["means"]["sae"], length=TINY_FORWARD + max(one["counts"]))
        assert_same_reduction(got["dense"], one["dense"], length=TINY_FORWARD)
        assert got["contexts"] == one["contexts"]


def test_an_input_too_long_is_refused_in_every_process(two_processes):
    """Only one process's share holds the input longer than the model's positions: both refuse it
    (one process alone, with its error swallowed where the explanation is optional, would leave the
    other waiting in a collective)."""
    assert len(two_processes.too_long) == 2
    for said in two_processes.too_long:
        assert "longer than" in said, said


def test_shards_interleave_and_may_be_empty():
    items = list(range(5))
    assert [shard(items, World(r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert shard([7], World(1, 2)) == [] and shard(items, World()) == items
    assert World(0, 2).describe() == "2 processes" and world() == World()


def test_two_processes_give_one_process_gradient_sides(two_processes):
    one = two_processes.one["sides"]
    for rank, ranked in enumerate(two_processes.ranks):
        got = ranked["sides"]
        assert got["world"] == World(rank, 2)
        assert (got["examples"], got["tokens"], got["records"]) == (one["examples"], one["tokens"], one["records"])
        assert one["g"].abs().sum() > 0
        # a mean over the examples' tokens of gradients, each from a forward and a backward pass
        length = 2 * TINY_FORWARD + one["tokens"]
        assert_same_reduction(got["g"], one["g"], length=length)
        assert_same_reduction(got["v"], one["v"], length=length)
        for name, side in one["sides"].items():
            assert_same_reduction(got["sides"][name], side, length=length)


@dataclass
class Launched:
    """One process's runs (in the test's process) and the same runs under one torchrun launch of two."""

    root: Path
    stdout: list[str]  # what each run printed (`tests/torchrun_runs.py` marks where each starts)
    stderr: list[str]  # the launch's account of each run

    def scores(self, out: str) -> dict[str, float]:
        import json

        return json.loads((self.root / out / "sts.json").read_text())["scores"]


VALIDATE = ["--max-train", "4", "--predict-examples", "5", "--k", "8", "--max-steps", "2", "--ft-batch-size", "2",
            "--replicates", "20", "--reference-examples", "3", "--metric", "cot_nll", "--no-question-evaluation",
            "--no-sft-shift", "--gradients"]


def _segments(text: str, runs: int) -> list[str]:
    parts = text.split("sts-test: run ")
    return ["".join(p.removeprefix(f"{n}\n") for p in parts if p.startswith(f"{n}\n")) for n in range(runs)]


@pytest.fixture(scope="session")
def launched(model_dirs, sae_dirs, tmp_path_factory) -> Launched:
    import json

    with built_once(tmp_path_factory, "launched") as (root, build):
        if build:
            done = _launched(model_dirs, sae_dirs, root)
            (root / "launched.json").write_text(json.dumps({"stdout": done.stdout, "stderr": done.stderr}))
        said = json.loads((root / "launched.json").read_text())
        return Launched(root, said["stdout"], said["stderr"])


def _launched(model_dirs, sae_dirs, root: Path) -> Launched:
    """Under two processes, in one launch: `sts predict` three ways (grad-adam with the SAE's
    explanation; `line`; `look`), `sts finetune`, `sts validate` and `sts select`; and the
    predictions, the validation and the selection in one process (this one) to compare with."""
    import json
    import os
    import subprocess
    import sys

    from sts.cli import main
    from tests.test_validation import _domain_file, _reference_file

    qa, domains = write_jsonl(root / "train.jsonl", QA_RECORDS), write_jsonl(root / "domains.jsonl", DOMAIN_RECORDS)
    references = str(_reference_file(root))  # records with reference chains of thought: line and look read them
    model = ["--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--train", str(qa)]
    grad = ["predict", *model, "--domains", str(domains), "--score", "grad-adam", "--gradient-sketch", "0"]
    ahead = ["predict", *model, "--domains", references, "--steps", "2", "--no-explain", "--score"]
    finetune = ["finetune", "--model", str(model_dirs["llama"]), "--train", str(qa), "--out", str(root / "tuned"),
                "--max-steps", "2", "--batch-size", "2"]
    (root / "v").mkdir()
    v_domains = _domain_file(root / "v")
    validate = ["validate", "--model", str(model_dirs["llama"]), "--sae", str(sae_dirs["topk"]), "--domains",
                str(v_domains), "--train", f"{v_domains}#category=math", "--train", f"{v_domains}#category=law",
                "--reference", str(references), *VALIDATE]
    select = ["select", *model, "--domains", str(domains), "--target", "math,law", "--count", "3", "--dim", "1024"]
    with pytest.MonkeyPatch.context() as mp_env:
        for cache, argv in [("cache-1", [*grad, "--out", str(root / "one")]),
                            ("cache-line", [*ahead, "line", "--out", str(root / "line-one")]),
                            ("cache-validate-one", [*validate, "--out", str(root / "validate-one")]),
                            ("cache-select-one", [*select, "--out", str(root / "select-one.jsonl")])]:
            mp_env.setenv("STS_CACHE", str(root / cache))
            assert main(argv) == 0
    runs = [{"cache": str(root / "cache-2"), "argv": [*grad, "--out", str(root / "two")]},
            {"cache": str(root / "cache-ahead"), "argv": [*ahead, "line", "--out", str(root / "line-two")]},
            {"cache": str(root / "cache-ahead"), "argv": [*ahead, "look", "--out", str(root / "look-two")]},
            {"cache": str(root / "cache-finetune"), "argv": finetune},
            {"cache": str(root / "cache-validate-two"), "argv": [*validate, "--out", str(root / "validate-two")]},
            {"cache": str(root / "cache-select-two"), "argv": [*select, "--out", str(root / "select-two.jsonl")]}]
    (root / "runs.json").write_text(json.dumps(runs))
    script = Path(__file__).resolve().parent / "torchrun_runs.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(root / "runs.json")], env=os.environ | {"OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return Launched(root, _segments(done.stdout, len(runs)), _segments(done.stderr, len(runs)))


def test_torchrun_predict_gives_one_process_scores_and_writes_once(launched):
    """Under two processes the plan line counts them, the main process writes the report and the
    cache, and the scores are one process's (with the SAE's explanation, whose statistics the
    processes share too)."""
    import json

    err = launched.stderr[0]
    assert "in each of 2 processes" in err and err.count("sts: to compute") == 1, err[-3000:]
    got, want = (json.loads((launched.root / d / "sts.json").read_text()) for d in ("two", "one"))
    assert got["scores"].keys() == want["scores"].keys()
    domains = sorted(want["scores"])
    # gradients of a forward and a backward pass over another share, then their inner product
    assert_same_reduction([got["scores"][d] for d in domains], [want["scores"][d] for d in domains],
                          length=2 * TINY_FORWARD + TINY_LORA)
    assert got["shifted_features"][:10] == want["shifted_features"][:10] and want["shifted_features"]
    assert [f["contexts"] for f in got["features"][:3]] == [f["contexts"] for f in want["features"][:3]]
    assert any(f["contexts"] for f in want["features"][:3])
    entries = sorted(p.name for p in (launched.root / "cache-2").rglob("*") if p.is_file())
    assert entries == sorted(p.name for p in (launched.root / "cache-1").rglob("*") if p.is_file())  # written once each


def test_torchrun_lookahead_scores_share_their_loss_passes(launched):
    """`line` under two processes (they share the domain losses' forward passes and the training
    gradients) gives one process's scores; `look` runs the trainer's data-parallel steps, which are
    another run's (their own entry in the cache), and still gives a score for every domain."""
    want, got = launched.scores("line-one"), launched.scores("line-two")
    assert got.keys() == want.keys() and len(want) == 4
    domains = sorted(want)  # a drop is a difference of two float32 losses (~5): their size is the scale
    assert_same_reduction([got[d] for d in domains], [want[d] for d in domains], length=TINY_FORWARD + 64, scale=5.0)
    look = launched.scores("look-two")
    assert look.keys() == want.keys() and all(v == v for v in look.values())


def test_a_process_that_fails_says_so_in_one_line_and_ends_the_run(tmp_path):
    """`torchrun --nproc-per-node 2 -m sts predict` on bad input: each process says so in one line,
    before anything is built (the embedded model is not converted into the cache first)."""
    import os
    import re
    import subprocess
    import sys

    env = os.environ | {"STS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sts", "predict", "--train", str(tmp_path / "missing.jsonl"), "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    lines = [line for line in done.stderr.splitlines() if line.startswith("sts: error")]
    assert 1 <= len(lines) <= 2, done.stderr[-2000:]  # one line a failing process (torchrun stops the rest)
    assert all(re.fullmatch(r"sts: error \(process [12] of 2\): dataset not found: .*", line) for line in lines), lines


def test_torchrun_finetune_trains_data_parallel_and_writes_once(launched):
    """`sts finetune` passes through to the trainer's own data parallelism (transformers/TRL under
    torchrun): the run's batch splits over the processes and the main process writes the model."""
    import json

    assert launched.stdout[3].count("fine-tuned on 5 examples") == 1, launched.stdout[3][-2000:]  # one report
    record = json.loads((launched.root / "tuned" / "finetune.json").read_text())
    assert len(record["losses"]) == 2 and (launched.root / "tuned" / "adapter").is_dir()
    assert not list(launched.root.glob("*.part"))


def test_a_batch_that_does_not_split_over_the_processes_is_refused(model_dirs, monkeypatch, tmp_path):
    import pytest

    from sts.engine.finetuning import sft_args
    from sts.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process it starts
    lm = load_model(str(model_dirs["llama"]))
    with pytest.raises(UserError, match="does not split over 2 processes"):  # before the trainer starts
        sft_args(FinetuneSpec(batch_size=3), lm.model, tmp_path)


def test_torchrun_validate_shares_its_stages_and_writes_one_results_folder(launched):
    """`sts validate` under two processes: every stage runs in both (the predictions' passes and the
    evaluations' questions shared, the fine-tuning data-parallel in the trainer), the main process
    writes the folder and reports once. The base evaluation and the prediction are one process's;
    the tuned model is not (the trainer's sampler orders the batches its own way), so neither is
    what it measures."""
    import csv
    import json

    out, err = launched.stdout[4], launched.stderr[4]
    assert out.count("swap test") == 1, out[-2000:]
    assert err.count("results.json, correlations.csv") == 1
    assert err.count("[validate] correlations") == 1  # one account of the run
    one, two = launched.root / "validate-one", launched.root / "validate-two"
    assert {p.name for p in (two / "stages").iterdir()} == {p.name for p in (one / "stages").iterdir()}
    assert json.loads((two / "results.json").read_text())["swap"]

    def base(folder: Path) -> dict[str, float]:
        with open(folder / "eval-base-reference" / "predictions.csv") as fh:
            return {r["question_id"]: float(r["cot_nll"]) for r in csv.DictReader(fh)}

    want, got = base(one), base(two)
    assert list(got) == list(want) and len(want) == 12  # every question once, in one process's order
    assert_same_reduction([got[q] for q in want], list(want.values()), length=TINY_FORWARD + LONGEST)
    for s in ("train-1-d-math", "train-2-d-law"):
        mine, theirs = (json.loads((folder / s / "scores-icl.json").read_text())["scores"] for folder in (two, one))
        for score, by_domain in theirs.items():
            domains = sorted(by_domain)
            assert_same_reduction([mine[score][d] for d in domains], [by_domain[d] for d in domains],
                                  length=TINY_FORWARD + 2 * LONGEST)  # features summed over a domain's tokens


def test_torchrun_select_shards_the_pool_and_chooses_as_one_process(launched):
    """Under two processes each computes half the pool's rows into one store; the main process
    ranks them: the same choice as one process, scores within the arithmetic's bound, written once."""
    import csv
    import io

    err = launched.stderr[5]
    assert err.count("wrote ") == 1, err[-3000:]
    got, want = (list(csv.DictReader(io.StringIO((launched.root / f"select-{n}.jsonl.scores.csv").read_text())))
                 for n in ("two", "one"))
    assert [r["chosen"] for r in got] == [r["chosen"] for r in want]
    assert (launched.root / "select-two.jsonl").read_text() == (launched.root / "select-one.jsonl").read_text()
    # each row: a backward pass in another process (its float32 sums in another order), stored at
    # float16: every element the same or its neighbouring float16
    import numpy as np

    (a, sa), (b, sb) = ((np.load(d / "rows.f16.npy").astype(np.float64), np.load(d / "scale.f32.npy")[:, None])
                        for d in (next((launched.root / c / "select").iterdir())
                                  for c in ("cache-select-two", "cache-select-one")))
    assert a.shape == b.shape and np.abs(a).sum() > 0
    # each element the same or its neighbouring float16 (of the row over its largest magnitude), and
    # the two scales (float32 maxima) as close as the float32 sums that reach them
    ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float64)
    assert np.allclose(sa, sb, rtol=1e-5, atol=0)
    assert (np.abs(a * sa - b * sb) <= ulp * np.maximum(sa, sb) + np.abs(sa - sb)).all()
