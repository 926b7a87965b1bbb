"""Many processes, one answer: the process group a run is launched in (`torchrun --nproc-per-node N`),
the share of the items each process reads, and the sums they reduce.

Why torch.distributed and not accelerate for the statistics: what a prediction needs of the
training examples and domain records are sums (G, v and token counts of the gradient sides; the
SAE features' counts, sums and squares; the shift's squared differences), so
each process reads every N-th item and one all-reduce gives the one-process answer; accelerate's
launcher sets the same environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`), so `accelerate launch`
runs this too. gloo serves the CPU, NCCL CUDA devices (`backend`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1 outside a launcher)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes outputs and cache entries."""
        return self.rank == 0

    def describe(self) -> str:
        return f"{self.size} processes" if self.size > 1 else "1 process"


def world() -> World:
    """The current process group's rank and size (one process when none is initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def backend(device: str) -> str:
    """NCCL between CUDA devices, gloo on the CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def init_from_env(device: str = "cpu") -> World:
    """Join the process group a launcher describes (`WORLD_SIZE` > 1 in the environment, as
    torchrun and accelerate set it); a plain run stays one process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if device.startswith("cuda"):  # one GPU a process: the launcher's local rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend(device))
    return world()


def join_run(device: str, progress: Callable[[str], None]) -> tuple[World, Callable[[str], None]]:
    """Join the launcher's process group for one run (`sts predict`, `sts validate`): the world, and
    the progress to report through (the main process's alone: one account of the run). The embedded
    model is converted into the cache later, where it is first needed (`models.default_model_dir`)."""
    w = init_from_env(device)
    if not w.main:
        progress = lambda _m: None  # noqa: E731
    return w, progress


def shard(items: Sequence[T], w: World) -> list[T]:
    """This process's items: every `size`-th from its rank on. Items sorted by length interleave,
    so each process gets long and short ones alike; a process may get none."""
    return list(items[w.rank::w.size])


def reduce_sum(tensors: list[torch.Tensor], w: World) -> list[torch.Tensor]:
    """Each tensor summed over the processes, in place (as it is with one process)."""
    if w.size > 1:
        import torch.distributed as dist

        nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only: the sums kept on the host go over
        for t in tensors:
            on = t.cuda() if nccl and not t.is_cuda else t
            dist.all_reduce(on, op=dist.ReduceOp.SUM)
            if on is not t:
                t.copy_(on.cpu())
    return tensors


def gather(obj: T, w: World) -> list[T]:
    """Every process's `obj` (picklable), in rank order: what does not reduce as a sum (each
    training example's own sparse shift entries, a dense export's rows)."""
    if w.size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[object] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out  # type: ignore[return-value]  # each process's `obj`


def agree(names: tuple[str, ...], w: World) -> tuple[str, ...]:
    """The main process's `names`, in every process: what it found missing in the cache is what
    all compute together (a process that read an entry the main one had not must compute too)."""
    if w.size == 1:
        return names
    import torch.distributed as dist

    box: list[object] = [names if w.main else None]
    dist.broadcast_object_list(box, src=0)
    return tuple(box[0])  # type: ignore[arg-type]  # the main process's tuple


def barrier(w: World) -> None:
    """Wait for every process (the main one's cache entries are written)."""
    if w.size > 1:
        import torch.distributed as dist

        dist.barrier()


def launched() -> int:
    """How many processes the launcher started (`WORLD_SIZE`), before any group is joined: the
    trainer joins its own (transformers' and TRL's distributed support)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))
