"""DDP set-up under torchrun (gloo on CPU, nccl on GPU) and the few collective helpers the engine needs."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a single process. Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = (
        torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if device in (None, "cuda", "cpu")
        else torch.device(device)
    )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend=backend, store=_attempt_store(rank, world), rank=rank, world_size=world)
        else:
            dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, dev)


def _attempt_store(rank: int, world: int) -> dist.Store:
    """The rendezvous store under torchrun, with keys prefixed by the restart attempt.

    After ``torchrun --max-restarts`` restarts the workers, the store still holds the previous attempt's addresses
    under the default keys, and the new group tries to connect to ranks that no longer exist (gloo: "Connection
    refused"). A prefix per attempt gives every attempt fresh keys."""
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_serves,
        timeout=timedelta(minutes=10),
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"upop/attempt_{attempt}", store)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP-wrap ``model`` when running on several ranks."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _flag_device(info: DistInfo) -> torch.device:
    return info.device if info.device.type == "cuda" else torch.device("cpu")


def all_ok(ok: bool, info: DistInfo) -> bool:
    """Whether ``ok`` holds on every rank (so all ranks raise together rather than one hanging in a collective)."""
    if not info.distributed:
        return ok
    flag = torch.tensor([1 if ok else 0], device=_flag_device(info))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_int(value: int, info: DistInfo) -> int:
    """Rank 0's ``value`` on every rank."""
    if not info.distributed:
        return value
    t = torch.tensor([value], device=_flag_device(info))
    dist.broadcast(t, src=0)
    return int(t.item())


def all_equal(tensor: torch.Tensor, info: DistInfo) -> bool:
    """Whether ``tensor`` is bitwise identical on every rank."""
    if not info.distributed:
        return True
    gathered = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank concatenated along dim 0 (rank order), without gradients; itself on one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(items: list) -> list:
    """The lists of every rank concatenated (rank order): picklable Python objects such as generated texts."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like ``gather``, but gradients flow back to every rank's own part (torch.distributed.nn's all_gather: its
    backward sums the gradients all ranks computed for a part). With DDP's gradient averaging this makes a loss over
    gathered features equal to the same loss over the whole global batch on one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()))


def teardown(wait: bool = True) -> None:
    """Leave the process group, with ``wait`` once every rank has got here: destroying gloo's group while another
    rank's last collective is still in flight can abort the process ("terminate called without an active
    exception"). Without ``wait`` (a rank that failed alone: the others are not coming) it leaves at once. Garbage
    (an autograd graph of a collective that never ran backward) is collected first: gloo work it holds must not be
    freed after the group, at interpreter exit, where it aborts the same way."""
    if dist.is_initialized():
        gc.collect()
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def group_size() -> int:
    """The number of processes of the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (in place; the tensor itself on one process): one decision everywhere."""
    if group_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def total(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks (in place; the tensor itself on one process)."""
    if group_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (in place; the tensor itself on one process)."""
    if group_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= group_size()
    return tensor
