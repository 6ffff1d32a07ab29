"""Data-parallel calibration across processes (``torchrun``, ``accelerate launch``): who this process is, which
calibration windows it takes, and the collectives every sum over windows goes through.

A launcher sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and the rendezvous address; ``init`` then joins the
process group (NCCL when CUDA is there, gloo on CPUs). Each rank takes one contiguous share of the calibration
windows (``World.share``); every statistic that is a sum over windows is summed over the ranks (``all_sum``)
before anything reads it, so the solves that follow see what one process would see; each linear's solve runs on
one owner rank (``owners``: the costliest first, to the least loaded rank) and its result is copied to the others
(``sync``, ``share_object``). Only rank 0 writes (``World.writer``). In one process every function here is the
identity, so the single-process paths are unchanged.

Why contiguous shares: window ``k`` of rank ``r`` is global window ``share.start + k``, so a loop that picks
global windows (reconstruction's batches, its held-out window) finds the ones it holds by subtraction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "TAYLORPRUNE_DIST_TIMEOUT"  # seconds a collective may wait for a silent rank (default below)
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes outputs, caches and reports (rank 0 only)."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """The global indices of the ``count`` windows this rank takes: a contiguous slice, sizes differing by at
        most one."""
        return range(count * self.rank // self.size, count * (self.rank + 1) // self.size)

    def describe(self, count: int | None) -> dict:
        shares = [len(World(r, self.size).share(count)) for r in range(self.size)] if count is not None else None
        return {"world_size": self.size, "backend": self.backend, "windows_per_rank": shares}


_WORLD = World()


def world() -> World:
    return _WORLD


def launched() -> bool:
    """Whether a launcher started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> World:
    """Join the process group the launcher describes (once); the world of one process when none does."""
    global _WORLD
    if _WORLD.active or not launched():
        return _WORLD
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend, timeout=timeout)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local, backend)
    return _WORLD


def shutdown() -> None:
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def _on_backend(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the backend can reduce it (NCCL: on the rank's GPU)."""
    if _WORLD.backend == "nccl" and t.device.type != "cuda":
        return t.to(f"cuda:{_WORLD.local_rank}")
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place; returns it."""
    if not _WORLD.active:
        return t
    moved = _on_backend(t)
    dist.all_reduce(moved)
    if moved is not t:
        t.copy_(moved)
    return t


def all_sum_number(x: float) -> float:
    """A number summed over the ranks (counts, losses), in float64."""
    if not _WORLD.active:
        return x
    return float(all_sum(torch.tensor([x], dtype=torch.float64)).item())


def sync(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` on every rank becomes rank ``src``'s, in place; returns it."""
    if not _WORLD.active:
        return t
    moved = _on_backend(t.detach())
    dist.broadcast(moved, src)
    if moved is not t:
        t.detach().copy_(moved)
    return t


def share_object(obj, src: int):
    """Rank ``src``'s picklable ``obj`` on every rank (a linear's record, its score)."""
    if not _WORLD.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def owners(costs: list[float]) -> list[int]:
    """The rank that works on each of the items of ``costs``: longest first to the least loaded rank, the same
    on every rank (all rank 0 in one process)."""
    load = [0.0] * _WORLD.size
    out = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        out[k] = min(range(_WORLD.size), key=lambda r: (load[r], r))
        load[out[k]] += costs[k]
    return out


def sync_module(module: torch.nn.Module) -> None:
    """Every parameter and buffer of ``module`` becomes rank 0's."""
    if not _WORLD.active:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            sync(t.data)


def barrier() -> None:
    if _WORLD.active:
        dist.barrier()
