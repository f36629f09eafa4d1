"""CUDA Graphs for the shallow and the deep sampling segments (DESIGN.md §4).

A static two-backbone schedule is what graphs can capture and data-dependent early exit cannot: every step
of a segment calls the same network on buffers of fixed shape. `GraphRunner` runs a `DuoSampler`'s
segments from static buffers:

- inputs (noise, labels, per-step noise drawn before the run, exactly as the eager sampler draws them)
  are copied into static buffers, the batch padded to a power-of-two *bucket* (results are sliced), so a
  new image count reuses a captured graph instead of breaking it or silently re-capturing;
- the shallow and the deep segment are captured separately, after a warm-up on a side stream (so the
  Triton autotuner has run), into one shared memory pool, and replayed in capture order; the multistep
  solver state (DPM-Solver++ history) lives in static buffers carried across the switch and is zeroed by
  the first graph; guidance (the doubled batch with null labels) is inside the graphs; no random number
  is drawn and nothing syncs with the host inside a captured region;
- two granularities: `mode="segment"` captures each segment's whole loop as one graph (one replay per
  segment; the default), `mode="step"` captures one step per segment as a graph that reads the step index
  from a static device tensor (solver coefficients, model time and noise are gathered from device tables
  by that index) and replays it once per step;
- graphs are cached per key (models, bucket, image shape, dtype, guidance, solver, steps, switch, mode)
  in an LRU cache of limited size; a new key is captured once (logged at DEBUG on `duodiff_fast.graphs`),
  and `release()` frees every graph and buffer.

Without CUDA (or with `capture=False`) the very same code runs eagerly on the static buffers: that is
how the CPU tests check buckets, padding, re-keying and the step-index path against the plain sampler.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import torch

from .._validate import ArgumentError, check_choice, check_int
from .segments import run_segment

__all__ = ["GraphRunner", "GraphCache", "CACHE", "bucket_size", "release"]

log = logging.getLogger("duodiff_fast.graphs")
MODES = ("segment", "step")


def bucket_size(n: int, max_bucket: int) -> int:
    """The power of two >= n that a batch of n is padded to (at most max_bucket; larger batches run in
    chunks of max_bucket)."""
    b = 1
    while b < min(n, max_bucket):
        b *= 2
    return min(b, max_bucket)


class GraphCache:
    """LRU cache of captured entries (static buffers + graphs), shared by every sampler of a process."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.captures = 0  # how many entries were built (a test and a benchmark read it)

    def get(self, key, build):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        entry = build()
        with self._lock:
            self.captures += 1
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                _, old = self._entries.popitem(last=False)
                old.free()
        return entry

    def __len__(self):
        return len(self._entries)

    def keys(self):
        return list(self._entries)

    def release(self, predicate=None):
        """Free every entry (or those whose key satisfies `predicate`)."""
        with self._lock:
            for k in [k for k in self._entries if predicate is None or predicate(k)]:
                self._entries.pop(k).free()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


CACHE = GraphCache()


def release():
    """Free every captured graph and static buffer of this process."""
    CACHE.release()


class _Entry:
    """Static buffers of one key and, when captured, its graphs and pool."""

    def __init__(self, sampler, bucket: int, mode: str, capture: bool):
        s = sampler
        dev = s.device
        C, H = s.in_channels, s.img_size
        self.bucket, self.mode, self.capture = bucket, mode, capture
        self.x = torch.zeros(bucket, C, H, H, device=dev, dtype=torch.float32)
        self.y = torch.zeros(bucket, device=dev, dtype=torch.long) if s.num_classes > 0 else None
        self.guided = s.guided  # labels doubled with the null class (some segment guides)
        self.null = (torch.full((bucket,), s.deep.null_class, device=dev, dtype=torch.long)
                     if self.guided else None)
        self.noise_steps = [i for i in range(s.steps) if s.solver.needs_noise(i)]
        self.noise = torch.zeros(len(self.noise_steps), bucket, C, H, H, device=dev, dtype=torch.float32)
        self.state = s.solver.init_state(self.x)
        self.graphs = []  # (segment, graph or None)
        self.pool = None
        # step mode: the index of the running step, and per-step tables it is gathered from
        self.step_index = torch.zeros((), device=dev, dtype=torch.long)
        slot = [0] * s.steps
        for j, i in enumerate(self.noise_steps):
            slot[i] = j
        self.noise_slot = torch.tensor(slot, device=dev, dtype=torch.long)
        self.index_table = torch.arange(s.steps, device=dev, dtype=torch.long)

    def labels(self):
        if self.y is None or not self.guided:
            return self.y
        return torch.cat([self.y, self.null])

    def noise_list(self, steps):
        out = [None] * steps
        for j, i in enumerate(self.noise_steps):
            out[i] = self.noise[j]
        return out

    def free(self):
        self.graphs, self.pool = [], None
        self.x = self.y = self.noise = self.state = None


class GraphRunner:
    """Runs the segments of `sampler` from static buffers; captures them as CUDA graphs when `capture`.

    Args:
        sampler: the DuoSampler whose segments, solver and guidance are run.
        capture: True (CUDA graphs; needs CUDA models), False (the same static-buffer code, eager), or
            None (capture on CUDA, eager elsewhere).
        mode: 'segment' (one graph per segment, the default) or 'step' (one graph per segment for a single
            step, replayed per step with the step index in a static device tensor).
        max_bucket: the largest padded batch; bigger requests run in chunks of it.
        cache: where entries live (default: the process-wide `CACHE`).
    """

    def __init__(self, sampler, capture=None, mode: str = "segment", max_bucket: int = 128, cache=None):
        self.sampler = sampler
        self.mode = check_choice(mode, "mode", MODES, where="GraphRunner")
        self.max_bucket = check_int(max_bucket, "max_bucket", minimum=1, where="GraphRunner")
        on_cuda = sampler.device.type == "cuda"
        if capture is None:
            capture = on_cuda
        if capture and not on_cuda:
            raise ArgumentError(f"GraphRunner: capture=True needs CUDA models; these are on {sampler.device}")
        self.capture = bool(capture)
        self.cache = CACHE if cache is None else cache

    # ---- keys and entries ----------------------------------------------------------------------
    def key(self, bucket: int) -> tuple:
        s = self.sampler
        solver = (s.solver_name, getattr(s.solver, "eta", 0.0), getattr(s.solver, "clip_sample", None),
                  getattr(s.solver, "order", 1), tuple(s._timesteps_host))
        guidance = (s.cfg_scale, s.shallow_cfg_scale, s.cfg_channels)
        return (id(s.shallow), id(s.deep), bucket, (s.in_channels, s.img_size, s.img_size), s.dtype, guidance,
                solver, s.steps, s.k, self.mode, self.capture, str(s.device))

    def _build(self, bucket):
        s = self.sampler
        entry = _Entry(s, bucket, self.mode, self.capture)
        log.debug("graphs: new key (bucket %d, %s, %d steps, %d shallow, mode %s, capture %s)", bucket,
                  s.solver_name, s.steps, s.k, self.mode, self.capture)
        if self.capture:
            self._capture(entry)
        return entry

    # ---- the segment programs (what is captured, or run eagerly) -------------------------------------
    # Every program reads the state from `entry.x` and writes its result back into it, so segments and
    # steps chain through one static buffer whatever the granularity.
    def _segment_program(self, entry, seg, first: bool):
        s = self.sampler
        denoise = s.denoiser(seg.model, seg.name)
        noise = entry.noise_list(s.steps)

        def program():
            if first:
                for v in entry.state.values():
                    v.zero_()  # a fresh multistep history for every run, inside the first graph
            x = run_segment(denoise, s.solver, entry.state, entry.x, seg.start, seg.stop, s._model_times,
                            entry.labels(), noise)
            entry.x.copy_(x)
        return program

    def _step_program(self, entry, seg, first: bool):
        """One step of `seg` at the step index held in `entry.step_index` (a device tensor)."""
        s = self.sampler
        denoise = s.denoiser(seg.model, seg.name)
        any_noise = bool(entry.noise_steps)

        def program():
            i = entry.step_index
            if first:
                keep = (i != 0).to(torch.float32)  # zero the multistep history at step 0 only
                for v in entry.state.values():
                    v.mul_(keep)
            eps = denoise(entry.x, s._model_times[i], entry.labels())
            noise = entry.noise[entry.noise_slot[i]] if any_noise else None
            entry.x.copy_(s.solver.step(entry.state, i, entry.x, eps, noise=noise))
        return program

    def _programs(self, entry):
        make = self._segment_program if self.mode == "segment" else self._step_program
        return [(seg, make(entry, seg, n == 0)) for n, seg in enumerate(self.sampler.segments)]

    def _capture(self, entry):
        """Warm up every program on a side stream, then capture the segments in order into one pool."""
        s = self.sampler
        entry.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=s.device)
        side.wait_stream(torch.cuda.current_stream(s.device))
        programs = self._programs(entry)
        with torch.cuda.stream(side):
            for seg, program in programs:
                entry.step_index.copy_(entry.index_table[seg.start])
                program()  # autotuning, lazy initialisation, allocator warm-up: before any capture
        torch.cuda.current_stream(s.device).wait_stream(side)
        torch.cuda.synchronize(s.device)
        graphs = []
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside a captured region raises
        try:
            for seg, program in programs:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=entry.pool):
                    program()
                graphs.append((seg, g))
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        entry.graphs = graphs

    # ---- running -------------------------------------------------------------------------------
    def run(self, x, y, step_noise, trace):
        """Sample from noise `x` [n, C, H, W] (float32, on the device), labels `y`, per-step noise (the
        eager sampler's list: a tensor per noisy step); fills `trace.seconds`; returns [n, C, H, W]."""
        n = x.shape[0]
        outs = []
        for lo in range(0, n, self.max_bucket):
            hi = min(n, lo + self.max_bucket)
            outs.append(self._run_chunk(x[lo:hi], None if y is None else y[lo:hi],
                                        [None if t is None else t[lo:hi] for t in step_noise], trace))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run_chunk(self, x, y, step_noise, trace):
        m = x.shape[0]
        bucket = bucket_size(m, self.max_bucket)
        entry = self.cache.get(self.key(bucket), lambda: self._build(bucket))
        entry.x[:m].copy_(x)
        entry.x[m:].zero_()
        if entry.y is not None:
            entry.y[:m].copy_(y)
            entry.y[m:].zero_()
        for j, i in enumerate(entry.noise_steps):
            entry.noise[j, :m].copy_(step_noise[i])
            entry.noise[j, m:].zero_()
        if self.capture:
            out = self._replay(entry, trace)
        else:
            out = self._eager(entry, trace)
        return out[:m].clone()

    def _replay(self, entry, trace):
        s = self.sampler
        for seg, g in entry.graphs:
            s._sync()
            t0 = time.perf_counter()
            if self.mode == "segment":
                g.replay()
            else:
                for i in range(seg.start, seg.stop):
                    entry.step_index.copy_(entry.index_table[i])  # device to device: no host sync
                    g.replay()
            s._sync()
            trace.seconds[seg.name] += time.perf_counter() - t0
        return entry.x

    def _eager(self, entry, trace):
        """The same programs without capture (CPU, or capture=False)."""
        s = self.sampler
        for seg, program in self._programs(entry):
            t0 = time.perf_counter()
            if self.mode == "segment":
                program()
            else:
                for i in range(seg.start, seg.stop):
                    entry.step_index.copy_(entry.index_table[i])
                    program()
            s._sync()
            trace.seconds[seg.name] += time.perf_counter() - t0
        return entry.x
