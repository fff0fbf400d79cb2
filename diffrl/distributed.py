"""Multi-process plumbing: torchrun initialisation, rank queries, collectives and a process pool.

Every helper is a no-op (or the single-process answer) when ``torch.distributed`` is not initialised, so
code written against it runs unchanged in one process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def is_initialized() -> bool:
    """Whether a process group is up (and torch was built with distributed support)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0: the process that logs, evaluates and writes checkpoints."""
    return rank() == 0


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group described by torchrun's environment and return this process's device.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through the
    ``env://`` rendezvous). Without ``WORLD_SIZE`` (a plain ``python`` launch) nothing is initialised.
    The backend defaults to NCCL when CUDA is available and Gloo otherwise; with CUDA, the process is bound
    to GPU ``LOCAL_RANK``.
    """
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if "WORLD_SIZE" not in os.environ or is_initialized():
        return device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend or ("nccl" if use_cuda else "gloo"),
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    return device


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all ranks in place and return it."""
    n = world_size()
    if n > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(n)
    return tensor


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (one collective per tensor)."""
    if world_size() > 1:
        for t in tensors:
            dist.broadcast(t.data, src=src)


def all_gather_object(obj: Any) -> list[Any]:
    """Collect one picklable object from each rank, in rank order (``[obj]`` when not distributed)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every rank reaches this point."""
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave and destroy the process group if one is up."""
    if is_initialized():
        dist.destroy_process_group()


def _single_thread_worker() -> None:
    torch.set_num_threads(1)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], processes: int) -> list[R]:
    """``[fn(x) for x in items]`` over a pool of ``processes`` spawned single-threaded workers, in order.

    ``fn`` and the items must be picklable (``fn`` defined at module level). ``processes <= 1`` runs in this
    process, which is also the natural choice for a handful of cheap items.
    """
    items = list(items)
    if processes <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(processes, len(items)), initializer=_single_thread_worker) as pool:
        return pool.map(fn, items, chunksize=1)
