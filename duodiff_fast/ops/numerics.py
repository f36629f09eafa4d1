"""The error rule of DESIGN.md §6, written once (tests and benchmarks import it).

flash-attention's rule: a fast kernel may be at most twice as far from the float64 reference as torch in
the same dtype, plus a small absolute allowance for the dtype:

    max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol(dtype)

Every element must also be finite (outputs are poisoned with NaN before a call in the tests, so an
element the kernel never wrote shows up here).
"""
from __future__ import annotations

import torch

DEFAULT_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _main(t):
    # ops with two outputs (residual, y) are checked on each; callers pass one tensor at a time
    return t[1] if isinstance(t, tuple) else t


def flash_rule(out, ref64, same_dtype, dtype=None, atol=None, slack=None) -> dict:
    """Check the rule; returns dict(ok, max_err, mean_err, torch_err, bound, first_bad, finite).
    `slack`: an optional per-element extra allowance (a tensor shaped like the output), e.g. one bf16 ulp
    where an interpreter truncates instead of rounding."""
    out, ref64, same_dtype = _main(out), _main(ref64), _main(same_dtype)
    dtype = dtype or out.dtype
    atol = DEFAULT_ATOL.get(dtype, 1e-5) if atol is None else atol
    if out.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    err = (out.double() - ref64.double()).abs()
    base = (same_dtype.double() - ref64.double()).abs().max().item() if same_dtype.numel() else 0.0
    bound = 2 * base + atol
    finite = bool(torch.isfinite(out).all())
    max_err = err.max().item() if err.numel() else 0.0
    over = err > bound if slack is None else err > bound + slack
    ok = finite and not bool(over.any())
    first_bad = None
    if not ok and err.numel():
        bad = torch.nonzero(~torch.isfinite(out) | over)
        first_bad = tuple(int(i) for i in bad[0]) if len(bad) else None
    return dict(ok=ok, max_err=max_err, mean_err=err.mean().item() if err.numel() else 0.0, torch_err=base,
                bound=bound, first_bad=first_bad, finite=finite)


def assert_flash_rule(name, out, ref64, same_dtype, dtype=None, atol=None, slack=None) -> dict:
    """`flash_rule`, printing max and mean error first; AssertionError naming the first mismatch."""
    r = flash_rule(out, ref64, same_dtype, dtype, atol, slack)
    print(f"{name}: max err {r['max_err']:.3e}, mean {r['mean_err']:.3e}; torch same-dtype max err "
          f"{r['torch_err']:.3e}; bound {r['bound']:.3e}")
    if not r["ok"]:
        o, ref = _main(out), _main(ref64)
        where = ""
        if r["first_bad"] is not None:
            idx = r["first_bad"]
            where = f"; first mismatch at {idx}: got {o[idx].item():.6g}, want {ref[idx].item():.6g}"
        what = "non-finite output (an element not written?)" if not r["finite"] else \
            f"max err {r['max_err']:.3e} > bound {r['bound']:.3e}"
        raise AssertionError(f"{name}: {what}{where}")
    return r
