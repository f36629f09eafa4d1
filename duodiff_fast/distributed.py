"""Multi-process helpers: process-group setup under `torchrun`, and sharded sampling.

Training and sampling run unchanged under `torchrun --nproc_per_node N`: NCCL on CUDA, gloo on CPU
(what the tests use). Without the torchrun environment everything is a single process (rank 0 of 1)
and no process group is created.

Sharded sampling is reproducible across process counts: the `n` samples are cut into fixed global
batches of `batch_size`; batch `b` is drawn from a CPU generator seeded by `(seed, b)` alone (its
labels first, then all of its noise), and rank `r` takes batches `r, r + world, ...`. So a sample's
noise and label depend on `(seed, batch_size, its index)` only, never on the number of ranks, and 1,
2 or 8 processes write exactly the same samples. Each rank writes `shard_{rank:03d}.npz` with the
global indices of its samples; `merge_shards` joins them in index order into `samples.npz`.
"""
from __future__ import annotations

import glob
import os
import time

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["init_distributed", "distributed_session", "is_main", "get_rank", "get_world_size", "barrier",
           "cleanup_distributed", "all_reduce_max",
           "batch_seed", "sample_sharded", "merge_shards", "SHARD_PATTERN"]

SHARD_PATTERN = "shard_{rank:03d}.npz"
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
# Sharded sampling
# -----------------------------------------------------------------------------

def batch_seed(seed: int, index: int) -> int:
    """A 63-bit seed that depends on (seed, index) only; SeedSequence mixing avoids the collisions of
    `seed * K + index`."""
    a, b = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(2, np.uint32)
    return ((int(a) << 32) | int(b)) & 0x7FFFFFFFFFFFFFFF


def _is_latent(sampler, latent):
    if latent is not None:
        return bool(latent)
    return sampler.in_channels not in (1, 3)


def sample_sharded(sampler, n: int, batch_size: int, seed: int, out_dir: str, rank: int = 0, world: int = 1,
                   progress: bool = True, latent: bool | None = None) -> dict:
    """Draw this rank's share of `n` samples with `sampler` and write `out_dir/shard_{rank:03d}.npz`.

    Global batch `b` (samples `b*batch_size ...`) goes to rank `b % world` and is drawn from a CPU
    generator seeded by `batch_seed(seed, b)`: labels first (class-conditional samplers, uniform over
    `sampler.label_range()`), then the sampler's noise. The shard holds 'indices' (int64 global
    indices), 'n', 'seconds', the samples as 'arr_0' (uint8 [N, H, W, C], images) or 'latents'
    (float32 [N, C, h, w]; `latent=None` guesses from the channel count) and 'labels' when conditional.
    Returns dict(path, count, seconds).
    """
    from .data import to_uint8

    if n < 1 or batch_size < 1:
        raise ValueError(f"sample_sharded: need n >= 1 and batch_size >= 1, got n={n}, "
                         f"batch_size={batch_size}")
    if not 0 <= rank < world:
        raise ValueError(f"sample_sharded: rank {rank} outside [0, {world})")
    latent = _is_latent(sampler, latent)
    nb = (n + batch_size - 1) // batch_size
    mine = list(range(rank, nb, world))
    count = sum(min(batch_size, n - b * batch_size) for b in mine)
    conditional = sampler.num_classes > 0
    xs, ys, idx, seconds = [], [], [], 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        desc = f"sampling rank {rank}/{world} ({sampler.k}/{sampler.steps} shallow steps)"
        bar = tqdm(total=count, desc=desc, unit="img", disable=rank != 0)
    for b in mine:
        start = b * batch_size
        size = min(batch_size, n - start)
        gen = torch.Generator(device="cpu").manual_seed(batch_seed(seed, b))
        y = torch.randint(0, sampler.label_range(), (size,), generator=gen) if conditional else None
        t0 = time.perf_counter()
        x = sampler.sample(n=size, y=y, generator=gen)
        x = x.cpu()  # waits for the device, so the clock below covers the work
        seconds += time.perf_counter() - t0
        xs.append(x.numpy().astype(np.float32) if latent else to_uint8(x))
        if conditional:
            ys.append(y.numpy().astype(np.int64))
        idx.append(np.arange(start, start + size, dtype=np.int64))
        if bar is not None:
            bar.update(size)
    if bar is not None:
        bar.close()
    C, S = sampler.in_channels, sampler.img_size
    empty = np.zeros((0, C, S, S), np.float32) if latent else np.zeros((0, S, S, C), np.uint8)
    arrays = {"latents" if latent else "arr_0": np.concatenate(xs) if xs else empty,
              "indices": np.concatenate(idx) if idx else np.zeros(0, np.int64),
              "n": np.int64(n), "seconds": np.float64(seconds)}
    if conditional:
        arrays["labels"] = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SHARD_PATTERN.format(rank=rank))
    tmp = path + ".tmp.npz"  # np.savez appends .npz to names without it
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a reader never sees a half-written shard
    return dict(path=path, count=count, seconds=seconds)


def list_shards(out_dir: str) -> list:
    return sorted(glob.glob(os.path.join(out_dir, "shard_[0-9][0-9][0-9].npz")))


def remove_shards(out_dir: str):
    """Delete shard files left in `out_dir` (by an earlier, possibly larger, run)."""
    for p in list_shards(out_dir):
        os.remove(p)


def merge_shards(out_dir: str, cleanup: bool = True, name: str = "samples.npz") -> str:
    """Join `out_dir/shard_*.npz` in global index order into `out_dir/samples.npz` ('arr_0' or
    'latents', plus 'labels' when present). Raises if an index is missing or duplicated, or shards
    disagree on `n`. Deletes the shards afterwards when `cleanup`. Returns the path written."""
    paths = list_shards(out_dir)
    if not paths:
        raise FileNotFoundError(f"merge_shards: no shard_*.npz in {out_dir}")
    parts = []
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            parts.append({k: z[k] for k in z.files})
    ns = {int(p["n"]) for p in parts}
    if len(ns) != 1:
        raise ValueError(f"merge_shards: shards in {out_dir} disagree on n ({sorted(ns)}); stale shards from "
                         "another run? remove them and sample again")
    n = ns.pop()
    key = "latents" if "latents" in parts[0] else "arr_0"
    if any(key not in p for p in parts):
        raise ValueError(f"merge_shards: shards in {out_dir} mix image and latent samples")
    idx = np.concatenate([p["indices"] for p in parts])
    counts = np.bincount(idx, minlength=n) if idx.size else np.zeros(n, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"merge_shards: indices outside [0, {n}) in {out_dir}")
    missing, dup = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    if missing.size or dup.size:
        raise ValueError(f"merge_shards: {out_dir} has {missing.size} missing samples (first "
                         f"{missing[:5].tolist()}) and {dup.size} duplicated (first {dup[:5].tolist()}) "
                         f"out of n={n}; did every rank finish?")
    order = np.argsort(idx, kind="stable")
    out = {key: np.concatenate([p[key] for p in parts])[order]}
    if "labels" in parts[0]:
        out["labels"] = np.concatenate([p["labels"] for p in parts])[order]
    path = os.path.join(out_dir, name)
    np.savez(path, **out)
    if cleanup:
        for p in paths:
            os.remove(p)
    return path
