"""Multi-process helpers: process-group setup under `torchrun`, collectives, and seeds.

Training and sampling run unchanged under `torchrun --nproc_per_node N`: NCCL on CUDA, gloo on CPU
(what the tests use). Without the torchrun environment everything is a single process (rank 0 of 1)
and no process group is created. Sampling to disk, one shard per rank, lives in
`duodiff_fast.sampling.sharded`.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["init_distributed", "distributed_session", "is_main", "get_rank", "get_world_size", "barrier",
           "cleanup_distributed", "all_reduce_max", "batch_seed"]

_OWNED = False  # True when init_distributed created the process group (so cleanup may destroy it)


# -----------------------------------------------------------------------------
# Process group
# -----------------------------------------------------------------------------

def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device=None):
    """Join the torchrun process group if there is one. Returns `(rank, world, device)`.

    `device`: None (cuda:LOCAL_RANK when CUDA is available, else cpu), 'cpu', 'cuda' or a
    torch.device. Backend: NCCL for CUDA devices, gloo for CPU. Without torchrun's environment (or
    with WORLD_SIZE=1) no group is created and `(0, 1, device)` is returned. Calling it again, or
    when the caller already initialised a group, reuses that group.
    """
    global _OWNED
    want = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() if want is None else want.type == "cuda"
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else _env_world()
    if world <= 1:
        dev = want if want is not None else torch.device("cuda" if use_cuda else "cpu")
        return 0, 1, dev
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)  # NCCL collectives and *_object helpers use the current device
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        _OWNED = True
    return dist.get_rank(), dist.get_world_size(), dev


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return get_rank() == 0


def barrier():
    """dist.barrier() when a group exists, else nothing."""
    if get_world_size() > 1:
        dist.barrier()


def cleanup_distributed():
    """Destroy the process group if `init_distributed` created it."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


class distributed_session:
    """`with distributed_session(device) as (rank, world, device):` joins the torchrun group and, on exit,
    destroys it only if it did not exist before (a caller's own group survives `train` or `sample`)."""

    def __init__(self, device=None):
        self.device = device

    def __enter__(self):
        self.existed = dist.is_available() and dist.is_initialized()
        return init_distributed(self.device)

    def __exit__(self, *exc):
        if not self.existed:
            cleanup_distributed()
        return False


def all_reduce_max(value: float, device) -> float:
    """The largest `value` over all ranks (the value itself in a single process)."""
    if get_world_size() <= 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# -----------------------------------------------------------------------------
# Seeds
# -----------------------------------------------------------------------------

def batch_seed(seed: int, index: int) -> int:
    """A 63-bit seed that depends on (seed, index) only; SeedSequence mixing avoids the collisions of
    `seed * K + index`."""
    a, b = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(2, np.uint32)
    return ((int(a) << 32) | int(b)) & 0x7FFFFFFFFFFFFFFF
