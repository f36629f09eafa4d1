"""Kernel benchmarks of duodiff_fast.ops against every provider a user could pick instead.

    python bench/kernels.py                      # everything this machine can do
    python bench/kernels.py --compile-report --out DIR   # only the sm_90a / sm_80 compile report

On a GPU: every op at the DESIGN §7 shapes (bf16), plus a size sweep of the norm family and
exit_confidence, across providers: torch eager, torch.compile, our triton (and cuda when `_C` is built),
each SDPA backend separately (flash, efficient, cudnn, math; timed *including* the transposes the packed
qkv layout needs), flash-attn and xformers when importable. Copy bandwidth and the bf16 matmul rate are
measured in the same run as ceilings. Times are medians of `triton.testing.do_bench` (20/80% quantiles
kept); attention in TFLOP/s (4*B*H*L*L*D), memory-bound ops in GB/s (bytes read + written once), each
with its fraction of the ceiling and its speed-up over the baseline (the best SDPA backend for
attention, torch eager otherwise).

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

# DESIGN §7 attention shapes (B, H, L, D): U-ViT-S CIFAR, U-ViT-L ImageNet-256, DiT-XL (D=72), L >= 1024.
ATTENTION_SHAPES = [(128, 8, 257, 64), (64, 16, 258, 64), (32, 16, 256, 72), (16, 16, 1026, 64)]
# Norm family: the two model shapes (U-ViT-S CIFAR, DiT-XL/2) and a sweep at DiT-XL width, 0.6 to 151 MB of x.
NORM_SHAPES = [(128, 257, 512), (32, 256, 1152)] + [(b, 256, 1152) for b in (1, 4, 16, 64, 128, 256)]
# exit_confidence (B, L, C, K): DuoDiff probe (K=1) and AdaDiff maps (K = p*p*C_img).
EXIT_SHAPES = [(128, 257, 512, 1), (128, 257, 512, 12), (32, 256, 1152, 1), (32, 256, 1152, 16),
               (256, 256, 1152, 1), (256, 256, 1152, 16)]
# CPU timings: reduced shapes (a 2-core CPU would take minutes at the GPU ones).
CPU_ATTENTION_SHAPES = [(4, 8, 257, 64), (2, 16, 256, 72)]
CPU_NORM_SHAPES = [(8, 257, 512), (4, 256, 1152)]
CPU_EXIT_SHAPES = [(8, 257, 512, 1), (4, 256, 1152, 16)]
NORM_OPS = ("layer_norm", "add_layer_norm", "adaln", "gated_adaln")


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def time_gpu(fn):
    """(median, p20, p80) in ms from triton.testing.do_bench (L2 flushed between runs)."""
    from triton.testing import do_bench

    med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
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

_COMPILED = {}


def _compiled(name, fn):
    # One torch.compile per function, shared across shapes (default dynamic: recompiles become dynamic).
    import torch

    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


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
        prov["torch.compile"] = lambda: _compiled("attention", ops.attention_sdpa)(qkv)
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
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s, dt=dtype):
        return torch.randn(*s, device=device, dtype=dt, generator=g)

    x = rnd(B, L, C)
    ada = rnd(B, 6 * C)  # DiT's adaLN Linear output: shift/scale/gate are strided chunks of it
    shift, scale, gate = ada[:, :C], ada[:, C:2 * C], ada[:, 2 * C:3 * C]
    w, b = rnd(C), rnd(C)
    return {
        "layer_norm": (x, w, b),
        "add_layer_norm": (x, rnd(B, L, C), w, b),
        "adaln": (x, shift, scale),
        "gated_adaln": (x, rnd(B, L, C), gate, shift, scale),
    }[op]


def norm_bytes(op, args):
    x = args[0]
    n = x.numel() * x.element_size()
    per_sample = sum(t.numel() * t.element_size() for t in args[1:] if t.dim() == 2)  # shift/scale/gate rows
    weights = sum(t.numel() * t.element_size() for t in args[1:] if t.dim() == 1)
    # x (+ update) read, y (+ residual) written, each once
    streams = {"layer_norm": 2, "add_layer_norm": 4, "adaln": 2, "gated_adaln": 4}[op]
    return streams * n + per_sample + weights


def norm_providers(op, args, with_compile, fast_backends):
    from duodiff_fast import ops
    from duodiff_fast.ops import norm

    torch_fn = {"layer_norm": norm.layer_norm_torch, "add_layer_norm": norm.add_layer_norm_torch,
                "adaln": norm.adaln_torch, "gated_adaln": norm.gated_adaln_torch}[op]
    public = getattr(ops, op)
    prov = {"torch": lambda: torch_fn(*args)}
    if with_compile:
        prov["torch.compile"] = lambda: _compiled(op, torch_fn)(*args)
    for be in fast_backends:
        prov[be] = lambda be=be: public(*args, backend=be)
    return prov


def exit_providers(args, with_compile, fast_backends):
    from duodiff_fast import ops

    prov = {"torch": lambda: ops.exit_confidence_ref(*args)}
    if with_compile:
        prov["torch.compile"] = lambda: _compiled("exit_confidence", ops.exit_confidence_ref)(*args)
    for be in fast_backends:
        prov[be] = lambda be=be: ops.exit_confidence(*args, backend=be)
    return prov


# --------------------------------------------------------------------------------------------------
# Benchmark loops
# --------------------------------------------------------------------------------------------------

def _max_err(out, ref64):
    a = out[1] if isinstance(out, tuple) else out
    r = ref64[1] if isinstance(ref64, tuple) else ref64
    return float((a.double() - r).abs().max())


def _measure(row, fn, timer, work, unit, ceiling):
    """Fill timing and rate fields of `row` (or `error` when the provider cannot run these inputs)."""
    import torch

    try:
        fn()  # first call: compile / autotune outside the timed region
        med, lo, hi = timer(fn)
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        return row
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    row.update(ms=_sig(med), ms_p20=_sig(lo), ms_p80=_sig(hi))
    rate = work / (med * 1e-3)
    if unit == "TFLOP/s":
        row["tflops"] = _sig(rate / 1e12)
        row["fraction_of_ceiling"] = _sig(rate / 1e12 / ceiling, 3)
    else:
        row["gbps"] = _sig(rate / 1e9)
        row["fraction_of_ceiling"] = _sig(rate / 1e9 / ceiling, 3)
    return row


def _sig(x, digits=4):
    return float(f"{x:.{digits}g}")


def _speedups(rows, baseline_of):
    """speedup = baseline ms / ms, per (op, shape); baseline_of(op) -> provider name or 'best-sdpa'."""
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
        if ref is None:
            continue
        for r in timed:
            r["baseline"] = ref["provider"]
            r["speedup"] = _sig(ref["ms"] / r["ms"], 3)


def bench_ops(device, dtype, timer, ceil, env, *, attention_shapes, norm_shapes, exit_shapes, with_compile,
              fast_backends, check_errors, progress=print):
    import torch

    from duodiff_fast import ops

    rows = []
    dname = str(dtype).replace("torch.", "")
    base = {"device": env["device"], "torch": env["torch"], "triton": env["triton"], "cuda": env["cuda"],
            "date": env["date"], "dtype": dname}

    def new_row(op, shape, provider, work_key, work):
        return {"op": op, "shape": shape, "provider": provider, work_key: work, **base}

    g = torch.Generator(device=device).manual_seed(0)
    for B, H, L, D in attention_shapes:
        qkv = torch.randn(B, L, 3, H, D, device=device, dtype=dtype, generator=g)
        shape = f"B={B} H={H} L={L} D={D}"
        flops = 4 * B * H * L * L * D
        ref64 = ops.attention_ref(qkv, upcast=True) if check_errors else None
        for name, fn in attention_providers(qkv, with_compile, fast_backends).items():
            row = _measure(new_row("attention", shape, name, "flops", flops), fn, timer, flops, "TFLOP/s",
                           ceil["matmul_tflops"])
            if check_errors and name in fast_backends and "error" not in row:
                row["max_err_vs_fp64"] = _max_err(fn(), ref64)
            rows.append(row)
            progress(_progress_line(row))
        del qkv, ref64

    for B, L, C in norm_shapes:
        for op in NORM_OPS:
            args = norm_inputs(op, B, L, C, device, dtype)
            nbytes = norm_bytes(op, args)
            shape = f"B={B} L={L} C={C} ({args[0].numel() * args[0].element_size() / 2**20:.1f} MiB x)"
            ref64 = getattr(ops, f"{op}_ref")(*args, upcast=True) if check_errors else None
            for name, fn in norm_providers(op, args, with_compile, fast_backends).items():
                row = _measure(new_row(op, shape, name, "bytes", nbytes), fn, timer, nbytes, "GB/s",
                               ceil["copy_gbps"])
                if check_errors and name in fast_backends and "error" not in row:
                    row["max_err_vs_fp64"] = _max_err(fn(), ref64)
                rows.append(row)
                progress(_progress_line(row))
            del args, ref64

    for B, L, C, K in exit_shapes:
        h = torch.randn(B, L, C, device=device, dtype=dtype, generator=g)
        w = (torch.randn(C, K, device=device, generator=g) / C**0.5).to(dtype)
        bias = torch.randn(K, device=device, generator=g).to(dtype)
        args = (h, w, bias, 1)  # start=1: skip the time token, as the probes do
        nbytes = h.numel() * h.element_size() + w.numel() * w.element_size() + 4 * B
        shape = f"B={B} L={L} C={C} K={K} ({h.numel() * h.element_size() / 2**20:.1f} MiB h)"
        ref64 = ops.exit_confidence_ref(*args, upcast=True) if check_errors else None
        for name, fn in exit_providers(args, with_compile, fast_backends).items():
            row = _measure(new_row("exit_confidence", shape, name, "bytes", nbytes), fn, timer, nbytes,
                           "GB/s", ceil["copy_gbps"])
            if check_errors and name in fast_backends and "error" not in row:
                row["max_err_vs_fp64"] = _max_err(fn(), ref64)
            rows.append(row)
            progress(_progress_line(row))
        del h, ref64

    _speedups(rows, lambda op: "best-sdpa" if op == "attention" else "torch")
    return rows


def _progress_line(r):
    if "error" in r:
        return f"  {r['op']:<16} {r['shape']:<40} {r['provider']:<14} n/a: {r['error']}"
    rate = f"{r['tflops']:.4g} TFLOP/s" if "tflops" in r else f"{r['gbps']:.4g} GB/s"
    return f"  {r['op']:<16} {r['shape']:<40} {r['provider']:<14} {r['ms']:.4g} ms  {rate}"


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
        a, r, s = (t[1] if isinstance(t, tuple) else t for t in (out, ref64, same))
        err = float((a.double() - r).abs().max())
        base = float((s.double() - r).abs().max())
        bound = 2 * base + ATOL[str(dtype).replace("torch.", "")]
        ok = bool(err <= bound and torch.isfinite(a).all())
        rows.append({"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "max_err": err,
                     "torch_same_dtype_err": base, "bound": bound, "ok": ok})

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
    head = ("| op | shape | provider | ms (p20-p80) | rate | of ceiling | speed-up | note |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | - | - | - | - | {r['error']} |")
            continue
        rate = f"{r['tflops']:.4g} TFLOP/s" if "tflops" in r else f"{r['gbps']:.4g} GB/s"
        sp = f"{r['speedup']}x vs {r['baseline']}" if "speedup" in r else "-"
        note = f"max err {r['max_err_vs_fp64']:.2e}" if "max_err_vs_fp64" in r else ""
        lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['ms']:.4g} ({r['ms_p20']:.4g}-"
                     f"{r['ms_p80']:.4g}) | {rate} | {100 * r['fraction_of_ceiling']:.3g}% | {sp} | {note} |")
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
    jpath.write_text(json.dumps(result, indent=2, default=str) + "\n")
    mpath.write_text(markdown + "\n")
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
    print(f"compile report: {', '.join(cr.ARCHS)} with triton's ptxas / cuobjdump")
    rows = cr.run(args.kernels, max_configs=args.max_configs)
    jpath, mpath = cr.write(rows, args.out)
    print()
    print(cr.format_table(rows))
    print(f"\nwrote {jpath} and {mpath}")
    return 1 if any("error" in r for r in rows) else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for JSON + markdown")
    parser.add_argument("--compile-report", action="store_true", help="only the ahead-of-time compile report")
    parser.add_argument("--kernels", nargs="*", default=None,
                        help="compile report: kernels to include (attention, norm, exit_confidence)")
    parser.add_argument("--max-configs", type=int, default=None,
                        help="compile report: first N configs per kernel")
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

    from duodiff_fast import _cpp_lib

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
            result["compile_report"] = cr.run(args.kernels, max_configs=args.max_configs)
            cr.write(result["compile_report"], args.out)
            md += ["## Ahead-of-time compile report", "", cr.format_table(result["compile_report"]), ""]

    fast = []
    if gpu:
        fast = ["triton"] + (["cuda"] if _cpp_lib.is_available() else [])
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
    md += [f"## Timings: {label}", "", format_bench_table(result["bench"]), ""]
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
    print(f"\nwrote {jpath} and {mpath}")
    if not gpu:
        print("This machine has no GPU: the GPU figures (kernel TFLOP/s and TB/s, speed-ups over SDPA / "
              "torch eager) need a GPU.")
    failed = [r for r in result["interpreter_check"] if not r.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
