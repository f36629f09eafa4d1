"""Kernel benchmarks of duodiff_fast.ops against every provider a user could pick instead.

    python bench/kernels.py                      # everything this machine can do
    python bench/kernels.py --compile-report [--triton local 3.6] [--jobs 2] --out DIR
                                                 # only the compile report (default: both Tritons)

On a GPU: every op at the DESIGN §7 shapes (bf16), plus a size sweep of the norm family and
exit_confidence, across providers: torch eager, torch.compile (compiled once per shape, static shapes:
one compiled function shared across shapes would fall back to dynamic-shape kernels), our triton (and
cuda when `_C` is built; `triton-v0`, the attention kernel before the issue-9 fix, for comparison),
each SDPA backend separately (flash, efficient, cudnn, math; timed *including* the transposes the packed
qkv layout needs), flash-attn and xformers when importable. The torch eager baseline of exit_confidence
is the torch backend (the matmul at h's dtype, no float32 copy of h).

Figures: GPU time is the median of `triton.testing.do_bench` (20/80% quantiles kept). Small batches
(batch 1-2, where launch and dispatch decide sampling speed) also get host-inclusive latency: wall clock
per call of back-to-back calls (Python dispatch included) and `triton.testing.do_bench_cudagraph` (one
replay per call). Every figure comes with its rate (TFLOP/s for attention, 4*B*H*L*L*D; GB/s for the
memory-bound ops, bytes read + written once) and that rate as a fraction of the ceiling measured in the
same run (device-to-device copy bandwidth, bf16 matmul rate), plus its speed-up over the baseline (the
best SDPA backend for attention, torch eager otherwise) and over torch.compile. Each provider's output
is checked against float64 with the DESIGN §6 rule (max|out - ref64| <= 2 * max|torch same dtype -
ref64| + atol): a fast backend that fails it fails the run. The DESIGN §7 bars are evaluated at the end.

On a CPU: Triton-interpreter correctness at small shapes (a subprocess with TRITON_INTERPRET=1), the
ahead-of-time compile report, and CPU timings of the torch paths at reduced shapes (labelled CPU); the
GPU figures need a GPU.

JSON + markdown go to --out (default bench/results/), named kernels_<date>_<device>.{json,md}; each row
carries the device name, versions and date. The table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # compile_report.py sits beside this file

sys.path.insert(0, str(HERE.parent))
import importlib  # noqa: E402

# The op modules (the package re-exports functions of the same names, hence import_module).
_attn_op, _exit_op, _norm_op = (importlib.import_module(f"duodiff_fast.ops.{m}")
                                for m in ("attention", "exit_confidence", "norm"))

# The benchmark shapes are declared with each op (its OpSpec): DESIGN §7 attention (B, H, L, D), the norm
# family (B, L, C) with a size sweep at DiT-XL width, exit_confidence (B, L, C, K); CPU-sized variants.
ATTENTION_SHAPES, CPU_ATTENTION_SHAPES = _attn_op.BENCH_SHAPES, _attn_op.SMALL_SHAPES
NORM_SHAPES, CPU_NORM_SHAPES = _norm_op.BENCH_SHAPES, _norm_op.SMALL_SHAPES
EXIT_SHAPES, CPU_EXIT_SHAPES = _exit_op.BENCH_SHAPES, _exit_op.SMALL_SHAPES
# Small batches (batch 1, and 2 = batch 1 with guidance): host-inclusive latency as well as GPU time.
SMALL_ATTENTION_SHAPES = [(1, 8, 257, 64), (2, 16, 258, 64)]
SMALL_NORM_SHAPES = [(1, 257, 512), (2, 256, 1152)]
SMALL_EXIT_SHAPES = [(1, 257, 512, 1), (2, 256, 1152, 16)]
NORM_OPS = _norm_op.NORM_OPS


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def time_gpu(fn):
    """(median, p20, p80) in ms from triton.testing.do_bench (L2 flushed between runs): GPU time."""
    from triton.testing import do_bench

    med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi


def time_host(fn, calls=200, repeats=5):
    """(median, p20, p80) in ms of wall clock per call over `calls` back-to-back calls and one final
    synchronize: what a Python loop pays per call, launch and dispatch included."""
    import torch

    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - t0) * 1e3 / calls)
    per_call.sort()
    return statistics.median(per_call), per_call[max(0, len(per_call) // 5)], per_call[-1 - len(per_call) // 5]


def time_graph(fn):
    """(median, p20, p80) in ms per call replayed from a CUDA graph (triton.testing.do_bench_cudagraph)."""
    from triton.testing import do_bench_cudagraph

    med, lo, hi = do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi


def time_cpu(fn, min_s=0.3, max_reps=30):
    """(median, p20, p80) in ms of wall time per call, after two warm-up calls."""
    fn()
    fn()
    times = []
    t_end = time.perf_counter() + min_s
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------

def environment(device):
    import torch

    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        env["capability"] = f"{major}.{minor}"
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                        f"{torch.get_num_threads()} threads)"
    return env


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:48]


def ceilings(device, timer):
    """Measured copy bandwidth (GB/s) and matmul rate (TFLOP/s; bf16 on GPU, fp32 on CPU)."""
    import torch

    gpu = device.type == "cuda"
    n = (512 if gpu else 64) * 2**20 // 4  # fp32 elements: 512 MiB on a GPU, 64 MiB on a CPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))[0]
    m = 8192 if gpu else 1024
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    mm_ms = timer(lambda: a @ b)[0]
    return {"copy_gbps": 2 * n * 4 / copy_ms / 1e6, "matmul_tflops": 2 * m**3 / mm_ms / 1e9,
            "matmul_dtype": str(dtype).replace("torch.", "")}


# --------------------------------------------------------------------------------------------------
# Providers: name -> zero-argument callable (None when not available here)
# --------------------------------------------------------------------------------------------------

def _compiled(fn):
    """torch.compile of `fn` for the current shape only. Dynamo caches per code object: a second shape
    through one compiled function recompiles with dynamic shapes (slower kernels), so every shape starts
    from a reset and compiles with static shapes."""
    import torch

    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _sdpa_provider(qkv, backend, sdpa_kernel):
    from duodiff_fast import ops

    def run():
        with sdpa_kernel([backend]):
            return ops.attention_sdpa(qkv)  # includes the permutes from the packed layout
    return run


def attention_providers(qkv, with_compile, fast_backends):

    from duodiff_fast import ops

    B, L, _, H, D = qkv.shape
    prov = {"torch-ref": lambda: ops.attention_ref(qkv), "torch": lambda: ops.attention_sdpa(qkv)}
    if with_compile:
        compiled = _compiled(ops.attention_sdpa)
        prov["torch.compile"] = lambda: compiled(qkv)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        sdpa_kernel = None
    if sdpa_kernel is not None:
        for name, be in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                         ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")):
            if hasattr(SDPBackend, be) and (qkv.is_cuda or name in ("flash", "math")):  # CPU has these two
                prov[f"sdpa-{name}"] = _sdpa_provider(qkv, getattr(SDPBackend, be), sdpa_kernel)
    for be in fast_backends:
        prov[be] = lambda be=be: ops.attention(qkv, backend=be)
    if "triton" in fast_backends:
        # The kernel before the issue-9 fix, timed in the same run: the honest before / after figure.
        sys.path.insert(0, str(HERE / "legacy"))
        from attention_v0 import attention_fwd as attention_v0  # bench/legacy/: not a package kernel

        prov["triton-v0"] = lambda: attention_v0(qkv, None)
    if qkv.is_cuda:
        try:
            from flash_attn import flash_attn_qkvpacked_func
        except ImportError:
            flash_attn_qkvpacked_func = None
        if flash_attn_qkvpacked_func is not None:
            prov["flash-attn"] = lambda: flash_attn_qkvpacked_func(qkv).reshape(B, L, H * D)
        try:
            import xformers.ops as xops
        except ImportError:
            xops = None
        if xops is not None:
            prov["xformers"] = lambda: xops.memory_efficient_attention(
                qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(B, L, H * D)
    return prov


def norm_inputs(op, B, L, C, device, dtype, seed=0):
    """Model-like inputs of a norm-family op (declared with the op: duodiff_fast.ops.norm.norm_inputs)."""
    return _norm_op.norm_inputs(op, B, L, C, device, dtype, seed)


def norm_bytes(op, args):
    """Bytes read and written once (the op's declared byte model)."""
    return _norm_op.SPECS[op].bytes(args)


def norm_providers(op, args, with_compile, fast_backends):
    from duodiff_fast import ops
    from duodiff_fast.ops import norm

    torch_fn = {"layer_norm": norm.layer_norm_torch, "add_layer_norm": norm.add_layer_norm_torch,
                "adaln": norm.adaln_torch, "gated_adaln": norm.gated_adaln_torch}[op]
    public = getattr(ops, op)
    prov = {"torch": lambda: torch_fn(*args)}
    if with_compile:
        compiled = _compiled(torch_fn)
        prov["torch.compile"] = lambda: compiled(*args)
    for be in fast_backends:
        prov[be] = lambda be=be: public(*args, backend=be)
    return prov


def exit_providers(args, with_compile, fast_backends):
    """The torch baseline is the torch backend: the matmul at h's dtype with fp32 accumulation, never a
    float32 copy of h (an upcast baseline reads h and writes and re-reads a copy twice its size, which
    inflated every speed-up)."""
    from duodiff_fast import ops
    from duodiff_fast.ops.exit_confidence import exit_confidence_torch

    prov = {"torch": lambda: exit_confidence_torch(*args)}
    if with_compile:
        compiled = _compiled(exit_confidence_torch)
        prov["torch.compile"] = lambda: compiled(*args)
    for be in fast_backends:
        prov[be] = lambda be=be: ops.exit_confidence(*args, backend=be)
    return prov


# --------------------------------------------------------------------------------------------------
# Benchmark loops
# --------------------------------------------------------------------------------------------------

# atol of the DESIGN §6 rule per op family and dtype (the tests' values).
RULE_ATOL = {
    "attention": {"float32": 1e-6, "float16": 2e-4, "bfloat16": 2e-3},
    "norm": {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2},
    "exit_confidence": {"float32": 1e-5, "float16": 1e-4, "bfloat16": 1e-4},
}
REFERENCE_PROVIDERS = ("torch-ref",)  # the same-dtype torch reference the rule's bound is made of


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def error_rule(out, ref64, same, atol):
    """DESIGN §6 (duodiff_fast.ops.numerics.flash_rule) on every output of an op: (max error, bound, ok),
    the largest error over outputs with that output's bound."""
    from duodiff_fast.ops.numerics import flash_rule

    worst = None
    for o, r, t in zip(_outputs(out), _outputs(ref64), _outputs(same)):
        res = flash_rule(o, r, t, atol=atol)
        cand = (res["max_err"], res["bound"], res["ok"])
        if worst is None or (not cand[2] and worst[2]) or (cand[2] == worst[2] and cand[0] > worst[0]):
            worst = cand
    return worst


def _rate_fields(prefix, work, ms, unit, ceiling):
    rate = work / (ms * 1e-3)
    if unit == "TFLOP/s":
        return {f"{prefix}tflops": _sig(rate / 1e12), f"{prefix}fraction_of_ceiling": _sig(rate / 1e12 / ceiling, 3)}
    return {f"{prefix}gbps": _sig(rate / 1e9), f"{prefix}fraction_of_ceiling": _sig(rate / 1e9 / ceiling, 3)}


def _measure(row, fn, timer, work, unit, ceiling, small_batch=False):
    """Fill timing and rate fields of `row` (or `error` when the provider cannot run these inputs).
    With `small_batch` on a GPU also host-inclusive wall clock and CUDA-graph replay per call."""
    import torch

    try:
        fn()  # first call: compile / autotune outside the timed region
        med, lo, hi = timer(fn)
    except (RuntimeError, ValueError, NotImplementedError, TypeError, AssertionError) as e:
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        return row
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    row.update(ms=_sig(med), ms_p20=_sig(lo), ms_p80=_sig(hi), **_rate_fields("", work, med, unit, ceiling))
    if small_batch and torch.cuda.is_available():
        for prefix, t in (("host_", time_host), ("graph_", time_graph)):
            try:
                m, a, b = t(fn)
            except (RuntimeError, ValueError, TypeError, AssertionError) as e:  # e.g. not capturable
                row[f"{prefix}error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
                torch.cuda.synchronize()
                continue
            row.update({f"{prefix}ms": _sig(m), f"{prefix}ms_p20": _sig(a), f"{prefix}ms_p80": _sig(b)})
            row.update(_rate_fields(prefix, work, m, unit, ceiling))
    return row


def _sig(x, digits=4):
    return float(f"{x:.{digits}g}")


def _speedups(rows, baseline_of):
    """speedup = baseline ms / ms per (op, shape, regime), baseline_of(op) -> provider name or
    'best-sdpa'; speedup_vs_compile the same against torch.compile (DESIGN §7 has bars for both)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"]), []).append(r)
    for (op, _), group in groups.items():
        timed = [r for r in group if "ms" in r]
        base = baseline_of(op)
        if base == "best-sdpa":
            cands = [r for r in timed if r["provider"].startswith("sdpa-")]
            ref = min(cands, key=lambda r: r["ms"]) if cands else None
        else:
            ref = next((r for r in timed if r["provider"] == base), None)
        comp = next((r for r in timed if r["provider"] == "torch.compile"), None)
        for r in timed:
            if ref is not None:
                r["baseline"] = ref["provider"]
                r["speedup"] = _sig(ref["ms"] / r["ms"], 3)
            if comp is not None:
                r["speedup_vs_compile"] = _sig(comp["ms"] / r["ms"], 3)


def _cases(device, dtype, attention_shapes, norm_shapes, exit_shapes):
    """(op, family, shape label, args factory, work, unit) for every benchmark input, in order."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    for B, H, L, D in attention_shapes:
        def make(B=B, H=H, L=L, D=D):
            return (torch.randn(B, L, 3, H, D, device=device, dtype=dtype, generator=g),)
        yield "attention", "attention", f"B={B} H={H} L={L} D={D}", make, None, "TFLOP/s"
    for B, L, C in norm_shapes:
        for op in NORM_OPS:
            def make(op=op, B=B, L=L, C=C):
                return norm_inputs(op, B, L, C, device, dtype)
            mib = B * L * C * torch.tensor([], dtype=dtype).element_size() / 2**20
            yield op, "norm", f"B={B} L={L} C={C} ({mib:.1f} MiB x)", make, None, "GB/s"
    for B, L, C, K in exit_shapes:
        def make(B=B, L=L, C=C, K=K):
            h = torch.randn(B, L, C, device=device, dtype=dtype, generator=g)
            w = (torch.randn(C, K, device=device, generator=g) / C**0.5).to(dtype)
            bias = torch.randn(K, device=device, generator=g).to(dtype)
            return (h, w, bias, 1)  # start=1: skip the time token, as the probes do
        mib = B * L * C * torch.tensor([], dtype=dtype).element_size() / 2**20
        yield "exit_confidence", "exit_confidence", f"B={B} L={L} C={C} K={K} ({mib:.1f} MiB h)", make, None, "GB/s"


def _work(op, args):
    """The op's declared work model: FLOPs for attention (compute-bound), bytes for the others."""
    from duodiff_fast.ops import SPECS
    spec = SPECS[op]
    return spec.flops(args) if op == "attention" else spec.bytes(args)


def _references(op, args):
    """(float64 reference, same-dtype torch reference) of the DESIGN §6 rule."""
    from duodiff_fast import ops

    if op == "attention":
        return ops.attention_ref(args[0], upcast=True), ops.attention_ref(args[0])
    ref = getattr(ops, f"{op}_ref")
    return ref(*args, upcast=True), ref(*args)


def bench_ops(device, dtype, timer, ceil, env, *, attention_shapes, norm_shapes, exit_shapes, with_compile,
              fast_backends, check_errors, small_batch=False, progress=print):
    """One row per (op, shape, provider). `small_batch`: these are the batch-1/2 shapes (host-inclusive
    latency too). `check_errors`: apply the DESIGN §6 rule to every provider's output."""
    import torch

    rows = []
    dname = str(dtype).replace("torch.", "")
    base = {"device": env["device"], "torch": env["torch"], "triton": env["triton"], "cuda": env["cuda"],
            "date": env["date"], "dtype": dname, "regime": "small-batch" if small_batch else "throughput"}
    for op, family, shape, make, work, unit in _cases(device, dtype, attention_shapes, norm_shapes, exit_shapes):
        args = make()
        work = work if work is not None else _work(op, args)
        ceiling = ceil["matmul_tflops"] if unit == "TFLOP/s" else ceil["copy_gbps"]
        refs = _references(op, args) if check_errors else None
        if op == "attention":
            providers = attention_providers(args[0], with_compile, fast_backends)
        elif op == "exit_confidence":
            providers = exit_providers(args, with_compile, fast_backends)
        else:
            providers = norm_providers(op, args, with_compile, fast_backends)
        for name, fn in providers.items():
            row = {"op": op, "shape": shape, "provider": name, ("flops" if unit == "TFLOP/s" else "bytes"): work,
                   **base}
            _measure(row, fn, timer, work, unit, ceiling, small_batch=small_batch)
            if check_errors and "error" not in row and name not in REFERENCE_PROVIDERS:
                err, bound, ok = error_rule(fn(), refs[0], refs[1], RULE_ATOL[family][dname])
                row.update(max_err_vs_fp64=_sig(err, 3), err_bound=_sig(bound, 3), err_ok=ok)
            rows.append(row)
            progress(_progress_line(row))
        del args, refs, providers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    _speedups(rows, lambda op: "best-sdpa" if op == "attention" else "torch")
    return rows


def error_failures(rows, fast_backends):
    """Rows of our backends (and the old kernel) that break the DESIGN §6 rule."""
    ours = set(fast_backends) | {"triton-v0"}
    return [r for r in rows if r["provider"] in ours and r.get("err_ok") is False]


def _mib(shape):
    m = re.search(r"\(([\d.]+) MiB", shape)
    return float(m.group(1)) if m else None


def evaluate_bars(rows):
    """DESIGN §7 kernel bars for the throughput rows of provider 'triton': list of {bar, shape, value, ok}."""
    out = []
    timed = [r for r in rows if r.get("regime") == "throughput" and "ms" in r and r["provider"] == "triton"]
    for r in timed:
        if r["op"] == "attention":
            L = int(re.search(r"L=(\d+)", r["shape"]).group(1))
            D = int(re.search(r"D=(\d+)", r["shape"]).group(1))
            if "speedup" in r:
                need = 1.3 if L < 1024 else 1.0
                out.append({"bar": f">= {need}x best SDPA", "op": "attention", "shape": r["shape"],
                            "value": r["speedup"], "ok": r["speedup"] >= need})
            if L >= 1024 and D == 64:
                out.append({"bar": ">= 400 TFLOP/s", "op": "attention", "shape": r["shape"],
                            "value": r["tflops"], "ok": r["tflops"] >= 400})
        else:
            mib = _mib(r["shape"])
            if mib is not None and mib * 2**20 >= 32e6:
                out.append({"bar": ">= 90% of copy bandwidth", "op": r["op"], "shape": r["shape"],
                            "value": r["fraction_of_ceiling"], "ok": r["fraction_of_ceiling"] >= 0.9})
            if "speedup_vs_compile" in r:
                out.append({"bar": ">= 1.3x torch.compile", "op": r["op"], "shape": r["shape"],
                            "value": r["speedup_vs_compile"], "ok": r["speedup_vs_compile"] >= 1.3})
            if "speedup" in r:
                out.append({"bar": ">= 2x torch eager", "op": r["op"], "shape": r["shape"],
                            "value": r["speedup"], "ok": r["speedup"] >= 2.0})
    return out


def format_bars(bars):
    lines = ["| bar | op | shape | value | met |", "|---|---|---|---|---|"]
    lines += [f"| {b['bar']} | {b['op']} | {b['shape']} | {b['value']} | {'yes' if b['ok'] else '**NO**'} |"
              for b in bars]
    return "\n".join(lines)


def _progress_line(r):
    if "error" in r:
        return f"  {r['op']:<16} {r['shape']:<40} {r['provider']:<14} n/a: {r['error']}"
    rate = f"{r['tflops']:.4g} TFLOP/s" if "tflops" in r else f"{r['gbps']:.4g} GB/s"
    extra = f"  host {r['host_ms']:.4g} ms" if "host_ms" in r else ""
    extra += f"  graph {r['graph_ms']:.4g} ms" if "graph_ms" in r else ""
    extra += "" if r.get("err_ok", True) else f"  ERROR RULE FAILED ({r['max_err_vs_fp64']:.3g} > {r['err_bound']:.3g})"
    return f"  {r['op']:<16} {r['shape']:<40} {r['provider']:<14} {r['ms']:.4g} ms  {rate}{extra}"


# --------------------------------------------------------------------------------------------------
# Interpreter correctness (CPU; runs in a child process with TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------------

ATOL = {"float32": 1e-5, "float16": 1e-3}


def interpreter_check():
    """Each op through backend='triton' vs its float64 reference at small shapes (DESIGN §6 rule)."""
    import torch

    from duodiff_fast import ops

    rows = []
    g = torch.Generator().manual_seed(0)

    def rule(op, shape, dtype, out, ref64, same):
        from duodiff_fast.ops.numerics import flash_rule
        r = flash_rule(out, ref64, same, dtype, ATOL[str(dtype).replace("torch.", "")])
        rows.append({"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "max_err": r["max_err"],
                     "torch_same_dtype_err": r["torch_err"], "bound": r["bound"], "ok": r["ok"]})

    for dtype in (torch.float32, torch.float16):  # bf16 tl.dot is wrong in the interpreter (DESIGN §6)
        for B, L, H, D in ((1, 1, 1, 32), (3, 17, 2, 72)):
            qkv = torch.randn(B, L, 3, H, D, generator=g).to(dtype)
            rule("attention", f"B={B} L={L} H={H} D={D}", dtype, ops.attention(qkv, backend="triton"),
                 ops.attention_ref(qkv, upcast=True), ops.attention(qkv, backend="torch"))
        for B, L, C in ((3, 17, 64), (2, 5, 1152)):
            for op in NORM_OPS:
                args = norm_inputs(op, B, L, C, torch.device("cpu"), dtype, seed=B * L)
                rule(op, f"B={B} L={L} C={C}", dtype, getattr(ops, op)(*args, backend="triton"),
                     getattr(ops, f"{op}_ref")(*args, upcast=True), getattr(ops, op)(*args, backend="torch"))
        for B, L, C, K in ((1, 1, 64, 1), (3, 17, 96, 12)):
            h = torch.randn(B, L, C, generator=g).to(dtype)
            w, b = (torch.randn(C, K, generator=g) / C**0.5).to(dtype), torch.randn(K, generator=g).to(dtype)
            start = min(1, L - 1)
            rule("exit_confidence", f"B={B} L={L} C={C} K={K}", dtype,
                 ops.exit_confidence(h, w, b, start, "triton"),
                 ops.exit_confidence_ref(h, w, b, start, upcast=True),
                 ops.exit_confidence(h, w, b, start, "torch"))
    return rows


def run_interpreter_check_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpreter-check"],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    if proc.returncode != 0:
        return [{"op": "interpreter-check", "ok": False, "error": proc.stderr.strip().splitlines()[-1:]}]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def format_bench_table(rows):
    # ms: GPU time (do_bench) on a GPU, wall time on a CPU; host / graph: small-batch rows on a GPU
    head = ("| op | shape | provider | ms (p20-p80) | rate | of ceiling | host ms/call (of ceiling) | "
            "graph ms/call (of ceiling) | speed-up | vs torch.compile | error vs fp64 (bound) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | - | - | - | - | - | - | - | {r['error']} |")
            continue
        rate = f"{r['tflops']:.4g} TFLOP/s" if "tflops" in r else f"{r['gbps']:.4g} GB/s"

        def lat(prefix, r=r):
            if f"{prefix}ms" in r:
                return f"{r[prefix + 'ms']:.4g} ({100 * r[prefix + 'fraction_of_ceiling']:.3g}%)"
            return r.get(f"{prefix}error", "-")
        sp = f"{r['speedup']}x vs {r['baseline']}" if "speedup" in r else "-"
        vc = f"{r['speedup_vs_compile']}x" if "speedup_vs_compile" in r else "-"
        err = "-"
        if "max_err_vs_fp64" in r:
            err = f"{r['max_err_vs_fp64']:.2e} ({r['err_bound']:.2e})" + ("" if r["err_ok"] else " **FAIL**")
        lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['ms']:.4g} ({r['ms_p20']:.4g}-"
                     f"{r['ms_p80']:.4g}) | {rate} | {100 * r['fraction_of_ceiling']:.3g}% | {lat('host_')} | "
                     f"{lat('graph_')} | {sp} | {vc} | {err} |")
    return "\n".join(lines)


def format_check_table(rows):
    lines = ["| op | shape | dtype | max err | torch same-dtype err | bound | ok |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | | | | | | FAILED: {r['error']} |")
        else:
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['max_err']:.2e} | "
                         f"{r['torch_same_dtype_err']:.2e} | {r['bound']:.2e} | "
                         f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def write_results(out_dir, env, result, markdown):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{env['date'][:10]}_{slug(env['device'].split(' (')[0])}"
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    from duodiff_fast import _io
    _io.write_text(jpath, json.dumps(result, indent=2, default=str) + "\n")
    _io.write_text(mpath, markdown + "\n")
    return jpath, mpath


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def main_compile_report(args):
    import compile_report as cr

    missing = cr.missing_tools()
    if missing:
        print(f"compile report skipped: {', '.join(missing)} not found "
              "(they ship with triton's NVIDIA backend)")
        return 0 if args.allow_missing_tools else 2
    print(f"compile report: {', '.join(cr.ARCHS)}, Triton {' and '.join(args.triton)}, with each Triton's "
          "ptxas / cuobjdump")
    rows, notes = cr.run(args.kernels, max_configs=args.max_configs, tritons=tuple(args.triton or ["local", "3.6"]),
                         jobs=args.jobs)
    jpath, mpath = cr.write(rows, args.out, notes)
    print()
    print(cr.format_table(rows))
    print()
    print("\n".join(cr.summary(rows)))
    for n in notes:
        print(f"note: {n}")
    print(f"\nwrote {jpath} and {mpath}")
    failed = any("error" in r for r in rows)
    if not args.no_csrc:
        # The CUDA C++ kernels beside the Triton rows: same columns, their own checks (bench/csrc_report.py).
        import csrc_report
        if csrc_report.missing_tools():
            print(f"CUDA C++ rows skipped: {', '.join(csrc_report.missing_tools())} not found")
        else:
            print("\nCUDA C++ kernels (csrc/), nvcc for sm_80 and sm_90a ...")
            res = csrc_report.run()
            cj, cm = csrc_report.write(res, args.out)
            print(csrc_report.format_checks(res))
            print(f"wrote {cj} and {cm}")
            failed = failed or not all(c["ok"] for c in res["checks"])
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for JSON + markdown")
    parser.add_argument("--compile-report", action="store_true", help="only the ahead-of-time compile report")
    parser.add_argument("--no-csrc", action="store_true",
                        help="compile report: leave out the CUDA C++ rows (bench/csrc_report.py)")
    parser.add_argument("--kernels", nargs="*", default=None,
                        help="compile report: kernels to include (attention, norm, exit_confidence)")
    parser.add_argument("--max-configs", type=int, default=None,
                        help="compile report: first N configs per kernel")
    parser.add_argument("--triton", nargs="*", default=None,
                        help="compile report: 'local' (this Triton) and/or '3.6' (a side venv, installed once); "
                             "default both with --compile-report, 'local' in a full run")
    parser.add_argument("--jobs", type=int, default=1, help="compile report: parallel compile processes")
    parser.add_argument("--allow-missing-tools", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile providers")
    parser.add_argument("--no-compile-report", action="store_true",
                        help="skip the compile report in a full run")
    # the child process of a CPU run, started with TRITON_INTERPRET=1
    parser.add_argument("--interpreter-check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.interpreter_check:
        rows = interpreter_check()
        print(json.dumps(rows))
        return 0 if all(r["ok"] for r in rows) else 1
    # The compile report needs real @triton.jit functions: no interpreter in this process.
    os.environ.pop("TRITON_INTERPRET", None)
    if args.compile_report:
        return main_compile_report(args)

    import torch


    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    env = environment(device)
    result = {"env": env, "bench": [], "interpreter_check": [], "compile_report": []}
    md = [f"# Kernel benchmarks: {env['device']}", "",
          (f"{env['date']}; torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
           f"python {env['python']}"), ""]
    timer = time_gpu if gpu else time_cpu
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}")

    ceil = ceilings(device, timer)
    result["ceilings"] = ceil
    ceil_text = (f"copy {ceil['copy_gbps']:.0f} GB/s, {ceil['matmul_dtype']} matmul "
                 f"{ceil['matmul_tflops']:.4g} TFLOP/s")
    md += [f"Ceilings measured in this run: {ceil_text}.", ""]
    print(f"ceilings: {ceil_text}")

    if not gpu:
        print("\nNo GPU: Triton-interpreter correctness, compile report and CPU timings of the torch paths.")
        print("interpreter correctness (TRITON_INTERPRET=1, child process) ...")
        result["interpreter_check"] = run_interpreter_check_subprocess()
        md += ["## Triton interpreter correctness (CPU, small shapes)", "",
               format_check_table(result["interpreter_check"]), ""]

    if not args.no_compile_report:
        import compile_report as cr

        if cr.missing_tools():
            md += [f"Compile report skipped: {', '.join(cr.missing_tools())} not found.", ""]
        else:
            print("compile report (sm_90a, sm_80) ...")
            # Into this run's results only: bench/results/compile_report.json is the two-Triton report the
            # tests check, written by --compile-report / bench/compile_report.py.
            result["compile_report"], notes = cr.run(args.kernels, max_configs=args.max_configs,
                                                     tritons=tuple(args.triton or ["local"]), jobs=args.jobs)
            md += [*(f"Compile report note: {n}" for n in notes), ""] if notes else []
            md += ["## Ahead-of-time compile report", "", cr.format_table(result["compile_report"]), ""]

    fast = []
    if gpu:
        # The fast backends the op registry has, where they can run here (cuda only when _C is built).
        from duodiff_fast import ops
        fast = [b for b in ops.BACKEND_NAMES if b != "torch"
                and all(not ops.IMPLS[op][b].unavailable_reasons() for op in ops.OPS if b in ops.IMPLS[op])]
        shapes = {"attention_shapes": ATTENTION_SHAPES, "norm_shapes": NORM_SHAPES,
                  "exit_shapes": EXIT_SHAPES}
        dtype, label = torch.bfloat16, "GPU"
    else:
        shapes = {"attention_shapes": CPU_ATTENTION_SHAPES, "norm_shapes": CPU_NORM_SHAPES,
                  "exit_shapes": CPU_EXIT_SHAPES}
        dtype, label = torch.float32, "CPU (torch paths only, reduced shapes)"
    print(f"timing ({label}) ...")
    with torch.inference_mode():
        result["bench"] = bench_ops(device, dtype, timer, ceil, env, **shapes, fast_backends=fast,
                                    with_compile=gpu and not args.no_compile, check_errors=gpu)
        if gpu:
            print("small batches: GPU time, host-inclusive wall clock and CUDA-graph replay ...")
            result["bench"] += bench_ops(device, dtype, timer, ceil, env, attention_shapes=SMALL_ATTENTION_SHAPES,
                                         norm_shapes=SMALL_NORM_SHAPES, exit_shapes=SMALL_EXIT_SHAPES,
                                         fast_backends=fast, with_compile=not args.no_compile, check_errors=True,
                                         small_batch=True)
    md += [f"## Timings: {label}", "", format_bench_table(result["bench"]), ""]
    if gpu:
        result["bars"] = evaluate_bars(result["bench"])
        md += ["## DESIGN §7 bars (provider triton)", "", format_bars(result["bars"]), ""]
    failures = error_failures(result["bench"], fast)
    if failures:
        md += ["## DESIGN §6 error rule FAILED", "",
               *(f"- {r['op']} {r['shape']} {r['provider']}: {r['max_err_vs_fp64']:.3g} > {r['err_bound']:.3g}"
                 for r in failures), ""]
    if not gpu:
        md += [("GPU figures (TFLOP/s and TB/s of the Triton/CUDA kernels, speed-ups over SDPA and torch "
                "eager, fractions of the H100 ceilings) need a GPU: run `python bench/kernels.py` on one.")]

    jpath, mpath = write_results(args.out, env, result, "\n".join(md))

    # Tables last.
    if result["compile_report"]:
        import compile_report as cr

        print("\nCompile report:")
        print(cr.format_table(result["compile_report"]))
    if result["interpreter_check"]:
        print("\nTriton interpreter correctness:")
        print(format_check_table(result["interpreter_check"]))
    print(f"\nTimings, {label}; ceilings: {ceil_text}:")
    print(format_bench_table(result["bench"]))
    if result.get("bars"):
        print("\nDESIGN §7 bars:")
        print(format_bars(result["bars"]))
    print(f"\nwrote {jpath} and {mpath}")
    if not gpu:
        print("This machine has no GPU: the GPU figures (kernel TFLOP/s and TB/s, speed-ups over SDPA / "
              "torch eager) need a GPU.")
    failed = [r for r in result["interpreter_check"] if not r.get("ok")]
    for r in failures:
        print(f"DESIGN §6 error rule failed: {r['op']} {r['shape']} {r['provider']}: "
              f"{r['max_err_vs_fp64']:.3g} > {r['err_bound']:.3g}")
    return 1 if failed or failures else 0


if __name__ == "__main__":
    sys.exit(main())
