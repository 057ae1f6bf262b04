"""torchrun / DistributedDataParallel glue.

Started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT),
training runs one process per device: NCCL between GPUs, gloo between CPU processes. Several
nodes use torchrun's own rendezvous (``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``);
nothing here is specific to one node.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import _env
from .errors import UserInputError


@dataclass
class Context:
    """This process's place in the run: rank among world_size processes, its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None) -> Context:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else a single process.

    device: None picks cuda:LOCAL_RANK when CUDA is available, else the CPU. Raises
    UserInputError for a CUDA device on a machine without one.
    """
    world_size = _env.integer("WORLD_SIZE", 1)  # ValueError for a value that is not an integer
    rank, local_rank = _env.integer("RANK", 0), _env.integer("LOCAL_RANK", 0)
    device = resolve_device(device, local_rank if world_size > 1 else None)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Context(rank, world_size, local_rank, device)


def resolve_device(device: str | None, local_rank: int | None = None) -> torch.device:
    """The torch.device for a ``--device`` value: None picks CUDA when available (cuda:local_rank
    under torchrun), else the CPU; a CUDA device becomes the current one. Raises UserInputError
    for a malformed name or a CUDA device on a machine without one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {device} asked for, but this machine's torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def cpu_threads(requested: int | None = None) -> tuple[int, str]:
    """How many threads torch's CPU ops should use in this process, and why (for the start-up line).

    requested (``--threads``) wins; else ``OMP_NUM_THREADS`` when set (torch already follows it);
    else this process's share of the cores it may run on (``os.sched_getaffinity``; under torchrun
    the local processes share them) less the cores other programs keep busy (the 1-minute load
    average, which lags by about a minute), at least 1. PyTorch's own default, one thread per core,
    is several times slower than one thread on cores that other programs load (README, Training:
    measured there).
    """
    if requested is not None:
        return requested, "--threads"
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) >= 1:
        return int(from_env), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return share, f"{cores} cores"
    idle = int(cores - load + 0.5)
    threads = max(1, min(share, idle))
    return threads, f"{cores} cores, load {load:.1f}"


def set_cpu_threads(requested: int | None = None) -> str:
    """Apply :func:`cpu_threads` to torch (``torch.set_num_threads``); returns e.g. "2 CPU threads
    (2 cores, load 0.1)"."""
    threads, why = cpu_threads(requested)
    torch.set_num_threads(threads)
    return f"{threads} CPU thread{'s' if threads != 1 else ''} ({why})"


def barrier(ctx: Context) -> None:
    """Wait for every rank. Called before a clean teardown: a rank that leaves the group while
    another still talks to it aborts in gloo ("terminate called without an active exception")."""
    if ctx.enabled:
        dist.barrier()


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """DistributedDataParallel around module when there are several ranks. Parameters the model
    never uses (the published checkpoint's qkvs, r_gate, lnout) stay out of the reduction and keep
    grad None on every rank, as in a single process."""
    if not ctx.enabled:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def all_reduce(tensor: torch.Tensor, ctx: Context, op=None) -> torch.Tensor:
    """Sum (or ``op``) over ranks, in place; a no-op in a single process. Returns tensor."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor, ctx: Context, dim: int) -> torch.Tensor:
    """The tensors of all ranks (same shape on each) concatenated along dim, in rank order.
    CPU tensors travel through the communication device (NCCL needs CUDA tensors)."""
    if not ctx.enabled:
        return tensor
    source = tensor.to(ctx.device).contiguous()
    parts = [torch.empty_like(source) for _ in range(ctx.world_size)]
    dist.all_gather(parts, source)
    return torch.cat(parts, dim=dim).to(tensor.device)


def broadcast_object(value, ctx: Context):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself in a single process."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
