"""What lrsparse needs from ``torch.distributed``: who writes files, and a check that ranks agree.

Under DistributedDataParallel every rank holds the same weights and, after ``backward()``, the same all-reduced
(averaged) gradients, so :class:`lrsparse.pruning.FirstOrderPruner` computes the same importance scores and masks on
every rank without any communication of its own. :func:`check_same_across_ranks` verifies that cheaply at each mask
update, so a pruner fed local (not all-reduced) gradients fails loudly instead of pruning each rank differently.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active (collectives can be called)."""
    return _group_initialized() and torch.distributed.get_world_size() > 1


def _group_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _launcher_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (set by torchrun), got {value!r}") from None


def rank() -> int:
    """This process's rank: the process group's, else the launcher's ``RANK`` (torchrun sets it before any group
    exists, and a program that never creates one still runs once per rank), else 0."""
    return torch.distributed.get_rank() if _group_initialized() else _launcher_int("RANK", 0)


def world_size() -> int:
    """Number of ranks: the process group's, else the launcher's ``WORLD_SIZE``, else 1."""
    return torch.distributed.get_world_size() if _group_initialized() else _launcher_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """True on rank 0 and in a single-process run: the process that writes checkpoints, reports and logs."""
    return rank() == 0


@torch.no_grad()
def fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    """Two float64 numbers that differ between rank-local copies of ``tensors`` unless they are equal (almost
    surely): the sum, and the sum weighted by each entry's position in the concatenation."""
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    weighted = torch.zeros_like(total)
    offset = 0
    for tensor in tensors:
        flat = tensor.detach().reshape(-1).double()
        position = torch.arange(offset + 1, offset + flat.numel() + 1, dtype=torch.float64, device=flat.device)
        total += flat.sum()
        weighted += (flat * position.remainder(1009.0)).sum()  # small weights: no precision lost to huge positions
        offset += flat.numel()
    return torch.stack([total, weighted])


@torch.no_grad()
def sum_across_ranks(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks (a collective: every rank calls it at the same point), on the device
    ``tensor`` is on; NCCL reduces on the rank's current GPU. ``tensor`` itself outside a multi-rank group."""
    if not is_distributed():
        return tensor
    on = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else \
        torch.device("cpu")
    total = tensor.to(on, copy=True)
    torch.distributed.all_reduce(total)
    return total.to(tensor.device)


@torch.no_grad()
def check_same_across_ranks(tensors: Sequence[Tensor], what: str) -> None:
    """Raises RuntimeError when ``tensors`` differ between ranks (no-op outside a multi-rank process group).

    Every rank must call it at the same point (it is a collective): the fingerprints are all-reduced with MIN and
    MAX and must be equal.
    """
    if not is_distributed() or not tensors:
        return
    local = fingerprint(tensors)
    low, high = local.clone(), local.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"{what} differ between ranks (rank {rank()} fingerprint {local.tolist()}, range {low.tolist()} .. "
            f"{high.tolist()}): the pruner must read the all-reduced gradients of a DistributedDataParallel "
            "model (pruner.step() after loss.backward() on the DDP-wrapped model, never under no_sync) and every "
            "rank must start from the same weights"
        )


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``), else 0."""
    return _launcher_int("LOCAL_RANK", 0)


def setup_from_launcher(device: str) -> tuple[torch.device, str] | None:
    """Under a multi-rank launch (torchrun's ``WORLD_SIZE`` > 1): joins the process group (creating it when the
    program has none yet: NCCL with one GPU per rank, ``cuda:LOCAL_RANK``, or gloo on CPUs) and returns (this rank's
    device, backend); None for a single process. ``device`` is the run's ``--device``: "auto", "cpu" or "cuda" (a
    fixed "cuda:N" would put every rank on one GPU)."""
    world = world_size()
    if world <= 1:
        return None
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if device not in ("auto", "cuda"):
            raise ValueError(f"device {device!r} under a {world}-rank launch would put every rank on one GPU: pass "
                             "--device cuda (or auto); each rank uses cuda:LOCAL_RANK")
        visible = torch.cuda.device_count()
        per_machine = _launcher_int("LOCAL_WORLD_SIZE", world)
        if per_machine > visible:
            raise ValueError(f"{per_machine} ranks per machine but {visible} visible CUDA device(s): launch at most "
                             f"{visible} processes per machine (torchrun --nproc_per_node), or run on the CPU "
                             "(--device cpu)")
        torch.cuda.set_device(local_rank())
        target, backend = torch.device("cuda", local_rank()), "nccl"
    else:
        target, backend = torch.device("cpu"), "gloo"
    if not _group_initialized():
        torch.distributed.init_process_group(backend)  # env://: torchrun's MASTER_ADDR, MASTER_PORT, RANK, ...
    return target, torch.distributed.get_backend()


def gather_objects(value) -> list:
    """``value`` of every rank, in rank order (a collective); ``[value]`` outside a multi-rank group."""
    if not is_distributed():
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def shard_bounds(count: int, rank_: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank_``'s contiguous share of ``count`` items (shares differ by at most one)."""
    return rank_ * count // world, (rank_ + 1) * count // world
