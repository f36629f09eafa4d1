"""Host overhead of one op call and of one denoiser forward: the Python, validation and dispatch time
spent before a kernel starts, which is what small-batch sampling pays per op without CUDA Graphs.

Runs on a CPU: the Triton backend is selected (TRITON_INTERPRET=1 makes it eligible for CPU tensors) and
every Triton launcher is replaced by a stub that only returns its (already allocated) outputs, so what is
timed is exactly the library's own per-call work: argument checks, backend choice, output allocation,
the custom-op boundary. Tensors are tiny (B=1) so the torch ops around the kernels (Linear, GELU) cost
little; the denoiser row is a 13-block U-ViT of width 64 on 17 tokens, timed on the dispatched Triton
path (stubbed) and on the plain torch path.

    python bench/host_overhead.py [--out bench/results] [--label after]

Times are medians over batches of 20 calls of this thread's CPU time (`time.thread_time_ns`), so that
time the OS gives to other processes on a shared machine is not counted; one torch thread.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: lets backend='triton' take CPU tensors

import torch  # noqa: E402

torch.set_num_threads(1)


def _stub_launchers():
    """Replace the Triton launchers by stubs that return their outputs without computing anything."""
    import duodiff_fast.kernels.attention as ka
    import duodiff_fast.kernels.exit_confidence as ke
    import duodiff_fast.kernels.norm as kn

    def attention_fwd(qkv, scale, out=None):
        if out is None:
            B, L, _, H, D = qkv.shape
            out = qkv.new_empty(B, L, H * D)
        return out

    def norm_fwd(x, *, eps, weight=None, bias=None, update=None, gate=None, shift=None, scale=None, out=None,
                 residual_out=None, **_):
        y = torch.empty_like(x) if out is None else out
        r = None if update is None else (torch.empty_like(x) if residual_out is None else residual_out)
        return r, y

    def exit_confidence_fwd(h, weight, bias, start=0, *args, **kwargs):
        return torch.empty(h.shape[0], dtype=torch.float32, device=h.device)

    ka.attention_fwd, kn.norm_fwd, ke.exit_confidence_fwd = attention_fwd, norm_fwd, exit_confidence_fwd


def _time_us(fn, min_calls=2000, min_s=0.5):
    for _ in range(50):
        fn()
    times = []
    t_end = time.perf_counter() + min_s
    while len(times) < min_calls or time.perf_counter() < t_end:
        # CPU time of this thread: time the OS gives other processes (helpers, builds) is not counted
        t0 = time.thread_time_ns()
        for _ in range(20):
            fn()
        times.append((time.thread_time_ns() - t0) / 20 / 1e3)
        if len(times) > 20 * min_calls:
            break
    return statistics.median(times)


def op_rows():
    from duodiff_fast import ops

    g = torch.Generator().manual_seed(0)
    B, L, C, H, D = 1, 4, 64, 1, 64

    def t(*s):
        return torch.randn(*s, generator=g)

    x, u = t(B, L, C), t(B, L, C)
    ada = t(B, 6 * C)
    sh, sc, ga = ada[:, :C], ada[:, C:2 * C], ada[:, 2 * C:3 * C]
    w, b = t(C), t(C)
    qkv = t(B, L, 3, H, D)
    hw, hb = t(C, 1), t(1)
    calls = {
        "attention": lambda: ops.attention(qkv, backend="triton"),
        "layer_norm": lambda: ops.layer_norm(x, w, b, 1e-5, backend="triton"),
        "add_layer_norm": lambda: ops.add_layer_norm(x, u, w, b, 1e-5, backend="triton"),
        "adaln": lambda: ops.adaln(x, sh, sc, 1e-6, backend="triton"),
        "gated_adaln": lambda: ops.gated_adaln(x, u, ga, sh, sc, 1e-6, backend="triton"),
        "exit_confidence": lambda: ops.exit_confidence(x, hw, hb, 0, backend="triton"),
        "layer_norm (auto, torch)": lambda: ops.layer_norm(x, w, b, 1e-5),
        "F.layer_norm (reference: one bare ATen op)": lambda: torch.nn.functional.layer_norm(x, (C,), w, b),
    }
    rows = []
    with torch.no_grad():
        for name, fn in calls.items():
            rows.append({"what": name, "us_per_call": round(_time_us(fn), 2)})
    return rows


def forward_rows():
    from duodiff_fast.models import UViT

    torch.manual_seed(0)
    model = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=64, depth=12, num_heads=1, mlp_ratio=4,
                 num_classes=0).eval()
    x = torch.randn(1, 3, 8, 8)
    t = torch.tensor([500.0])
    rows = []
    with torch.no_grad():
        for label, env in (("U-ViT 13 blocks, ops on triton (launch stubbed)", "triton"),
                           ("U-ViT 13 blocks, ops on torch", "torch")):
            os.environ["DUODIFF_BACKEND"] = env
            rows.append({"what": label, "us_per_call": round(_time_us(lambda: model(x, t), 200, 1.0), 1)})
        os.environ.pop("DUODIFF_BACKEND", None)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for host_overhead_<date>_<label>.json")
    p.add_argument("--label", default="", help="a tag for the file name (e.g. before / after)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line (for other benchmarks)")
    p.add_argument("--ops-only", action="store_true", help="skip the denoiser-forward rows")
    args = p.parse_args(argv)
    _stub_launchers()
    rows = op_rows() + ([] if args.ops_only else forward_rows())
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "label": args.label,
            "note": "CPU thread time per call, median; Triton launches stubbed (host work only)"}
    try:
        import subprocess
        meta["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}))
        return 0
    width = max(len(r["what"]) for r in rows)
    print(f"host overhead per call ({meta['cpu']}, 1 thread, torch {meta['torch']}; CPU timings)")
    for r in rows:
        print(f"  {r['what']:<{width}}  {r['us_per_call']:>9.2f} us")
    if args.out:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from duodiff_fast import _io
        name = f"host_overhead_{meta['date'][:10]}{'_' + args.label if args.label else ''}.json"
        path = os.path.join(args.out, name)
        _io.write_json(path, {"meta": meta, "rows": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
