"""Devices and processes: the device, seeding, and several processes under torchrun (rank, process
group, collectives), with helpers that do nothing in a single process."""
import contextlib
import os
import random
import resource
import sys

import numpy as np
import torch

from ops import use_fast_kernels
from settings import UserError


def resolve_device(name, flag="--device"):
    """'auto' -> cuda when present, else cpu; asking for CUDA without one is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} cuda: CUDA is not available on this machine (use {flag} cpu)")
    return torch.device(name)


def describe_device(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def peak_memory_mb(device):
    """CUDA: the most memory tensors took; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_device(cfg):
    """-> (rank, world_size, device): the device, the torchrun process group when there is one, and
    the fast CUDA settings (TF32 matrix products and convolutions, cuDNN's autotuner)."""
    rank, world_size, device = init_distributed(resolve_device(cfg.device))
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # one process speaks: rank 0
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly across {world_size} processes")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    use_fast_kernels(device, cfg.winograd)
    return rank, world_size, device


@contextlib.contextmanager
def joined(cfg):
    """setup_device's (rank, world_size, device) for the block, leaving the process group at its end. At a
    normal end the processes first wait for one another: Gloo's threads then drop the last collective's tensors
    while Python still runs (dropping them during the interpreter's exit can abort the process). After an
    error a process leaves at once, never waiting for one that has gone."""
    try:
        yield setup_device(cfg)
        wait_for_all()
    finally:
        close_distributed()


# ---------------------------------------------------------------------------------------
# Several processes (torchrun)
# ---------------------------------------------------------------------------------------
def launched_processes():
    """How many processes torchrun started (WORLD_SIZE; 1 without torchrun), known before joining."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank():
    """This process's rank under torchrun (0 when there is a single process), known before joining."""
    return int(os.environ.get("RANK", "0")) if launched_processes() > 1 else 0


def init_distributed(device):
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, Gloo on CPU).
    Returns (rank, world_size, device): each process takes the GPU of its LOCAL_RANK."""
    world_size = launched_processes()
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: this node has only {torch.cuda.device_count()} GPUs "
                            "(lower torchrun's --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=(
        device if device.type == "cuda" else None))
    return rank, world_size, device


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_mean(tensors):
    """Average each tensor of a list over the processes, in place, with one flat all-reduce."""
    if distributed() and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors]).div_(torch.distributed.get_world_size())
        torch.distributed.all_reduce(flat)
        torch._foreach_copy_(tensors, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]),
                                                                     tensors)])
    return tensors


def reduce_over_processes(value, op, device):
    """A number combined over the processes: their "sum", "max" or "mean"; the number itself in one process."""
    if not distributed():
        return value
    t = torch.tensor(float(value), device=device, dtype=torch.float64)
    ops = torch.distributed.ReduceOp
    torch.distributed.all_reduce(t, op=ops.MAX if op == "max" else ops.SUM)
    return t.item() / (torch.distributed.get_world_size() if op == "mean" else 1)


def wait_for_all():
    """Go on when every process has come here (to time a thing together, or to leave); nothing in one process."""
    if distributed():
        torch.distributed.barrier()


def same_on_every_process(tensors):
    """True when the tensors hold the same values in every process (the replicas stay in step)."""
    if not distributed():
        return True
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    fingerprint = torch.stack([flat.sum(), flat.square().sum(), -flat.sum(), -flat.square().sum()])
    torch.distributed.all_reduce(fingerprint, op=torch.distributed.ReduceOp.MAX)
    return bool((fingerprint[:2] == -fingerprint[2:]).all())


def any_process(flag, device):
    """True on every process when `flag` is true on any (a stop signal seen by one process stops all)."""
    if not distributed():
        return flag
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def close_distributed():
    if distributed():
        torch.distributed.destroy_process_group()
