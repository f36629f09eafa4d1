"""Sampling to disk, one shard per rank, reproducible across process counts.

The `n` samples are cut into fixed global batches of `batch_size`; batch `b` is drawn from a CPU generator
seeded by `(seed, b)` alone (its labels first, then all of its noise), and rank `r` takes batches
`r, r + world, ...`. So a sample's noise and label depend on `(seed, batch_size, its index)` only, never
on the number of ranks, and 1, 2 or 8 processes write exactly the same samples. Each rank writes
`shard_{rank:03d}.npz` with the global indices of its samples; `merge_shards` joins them in index order
into `samples.npz`. Every file is written atomically (`duodiff_fast._io`).
"""
from __future__ import annotations

import glob
import os
import time

import numpy as np
import torch

from .. import _io
from .._validate import check_int
from ..distributed import batch_seed

__all__ = ["sample_sharded", "merge_shards", "list_shards", "remove_shards", "SHARD_PATTERN"]

SHARD_PATTERN = "shard_{rank:03d}.npz"


def _is_latent(sampler, latent):
    if latent is not None:
        return bool(latent)
    from ..models.configs import is_latent
    return is_latent(None, sampler.in_channels)


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
    from ..data import to_uint8

    n = check_int(n, "n", minimum=1, where="sample_sharded")
    batch_size = check_int(batch_size, "batch_size", minimum=1, where="sample_sharded")
    world = check_int(world, "world", minimum=1, where="sample_sharded")
    rank = check_int(rank, "rank", minimum=0, maximum=world - 1, where="sample_sharded")
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
    path = os.path.join(out_dir, SHARD_PATTERN.format(rank=rank))
    _io.savez(path, **arrays)  # a reader never sees a half-written shard
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
    _io.savez(path, **out)
    if cleanup:
        for p in paths:
            os.remove(p)
    return path
