"""Process-group setup for `torchrun` (NCCL on GPUs, gloo on CPU) and small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


# The timeout of a process group whose processes may finish far apart: those of a prediction
# shared by many wait at the end for the slowest, which may take hours longer (a slower machine,
# larger images). A process that dies ends the run through torchrun, not through this timeout.
LONG_WAIT = timedelta(days=7)


class DeviceError(RuntimeError):
    """The requested device does not exist here; the message says which and what to use."""


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; an unavailable device is a `DeviceError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise DeviceError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", timeout: timedelta | None = None) -> DistInfo:
    """Join the process group that `torchrun` describes in the environment, if any; `timeout`:
    how long a collective may wait for the slowest process (None: torch's default)."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(rank, world, local, dev)


def restart_count() -> int:
    """How many times torchrun has restarted this worker group after a failure (`--max-restarts`);
    0 on the first attempt and outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_objects(obj) -> list:
    """Every process's `obj`, in rank order (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def sum_over_processes(value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`(value summed over all processes, number of processes)`; the trainer hands this to
    the model's loss, which runs no collective itself."""
    if not is_distributed():
        return value, 1
    total = value.detach().clone()
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return total.to(value.device), dist.get_world_size()


def any_over_processes(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them."""
    if not is_distributed():
        return flag
    t = torch.tensor([float(flag)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
