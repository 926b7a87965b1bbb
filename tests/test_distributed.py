"""Many processes, one answer (issue 43): two processes with gloo on the CPU, each reading its share
of the training examples and domain records, reduce to the same gradient sides (G, v, counts and
each domain's mean gradient) as one process, with uneven shards and a shard with no record."""

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
