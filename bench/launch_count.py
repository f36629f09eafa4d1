"""How many kernels one denoiser call launches: the work CUDA Graphs remove from the host at small batch.

Counted on a CPU with a `TorchDispatchMode`: every ATen op that would run a kernel (views, `empty` and
other metadata-only ops excluded) plus every fused-kernel launch of our backends (the Triton launchers
are replaced by counting stubs: `attention` and the norm family launch one kernel, `exit_confidence` two).
Two ways to run the same weights:

- official: every block as the official code writes it (`models.layers.torch_path`): LayerNorm, SDPA on
  transposed q/k/v, separate residual adds (the fp32 eager baseline of bench/sampling.py);
- ours: the inference path on the fused ops (packed-qkv attention, residual add fused with the next
  LayerNorm / adaLN).

Reported per denoiser call, per block (the embed and head excluded), and per sampling step (one
denoiser call plus the solver update). With a measured host cost per launch this predicts the
small-batch time per step that graph replay removes.

    python bench/launch_count.py [--preset uvit_cifar10_small] [--json]

Runs in its own process (it sets TRITON_INTERPRET=1 before triton is imported, which only lets the
Triton backend accept CPU tensors; every launcher is a stub, nothing is interpreted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ["DUODIFF_BACKEND"] = "triton"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Ops that run no kernel: tensor metadata, allocation without initialisation, autograd bookkeeping.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
             "lift_fresh", "_to_copy_noop", "set_", "resize_", "_reshape_alias", "as_strided", "view",
             "_unsafe_view", "unsqueeze", "squeeze", "t", "transpose", "permute", "expand", "select", "slice",
             "split", "split_with_sizes", "unbind", "chunk", "narrow", "reshape", "flatten", "contiguous_noop"}


class LaunchCounter(TorchDispatchMode):
    """Counts ATen ops that launch a kernel (by name) while active."""

    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        base = func.__name__.split(".")[0]
        if not (getattr(func, "is_view", False) or base in NO_KERNEL):
            self.ops[base] = self.ops.get(base, 0) + 1
        return out

    @property
    def total(self):
        return sum(self.ops.values())


class FusedLaunches:
    """Replaces the Triton launchers with stubs that count launches and return the preallocated outputs."""

    def __init__(self):
        self.calls = {}

    def install(self):
        import duodiff_fast.kernels.attention as ka
        import duodiff_fast.kernels.exit_confidence as ke
        import duodiff_fast.kernels.norm as kn

        def attention_fwd(qkv, scale, out=None):
            self.calls["attention"] = self.calls.get("attention", 0) + 1
            return out

        def norm_fwd(x, *, eps, out=None, residual_out=None, **kw):
            self.calls["norm"] = self.calls.get("norm", 0) + 1
            return residual_out, out

        def exit_confidence_fwd(h, weight, bias, start=0, *a, **k):
            self.calls["exit_confidence"] = self.calls.get("exit_confidence", 0) + 2  # two-stage reduction
            return torch.empty(h.shape[0])

        ka.attention_fwd, kn.norm_fwd, ke.exit_confidence_fwd = attention_fwd, norm_fwd, exit_confidence_fwd
        return self

    @property
    def total(self):
        return sum(self.calls.values())


def _count(fn, fused):
    before = dict(fused.calls)
    with LaunchCounter() as c:
        fn()
    new_fused = {k: fused.calls.get(k, 0) - before.get(k, 0) for k in fused.calls}
    return c.total + sum(new_fused.values()), dict(c.ops, **{f"fused:{k}": v for k, v in new_fused.items() if v})


def count(preset: str, batch: int = 2, solver: str = "ddim", guided: bool | None = None) -> dict:
    """Launch counts of one denoiser call of `preset` (random weights), official-style and ours."""
    from duodiff_fast.models import create_model
    from duodiff_fast.models.layers import torch_path
    from duodiff_fast.sampling import DuoSampler

    fused = FusedLaunches().install()
    torch.manual_seed(0)
    model = create_model(preset).eval()
    C, S = model.in_channels, model.img_size
    x = torch.randn(batch, C, S, S)
    t = torch.full((batch,), 0.5)
    y = torch.zeros(batch, dtype=torch.long) if model.num_classes else None
    call = (lambda: model(x, t, y)) if y is not None else (lambda: model(x, t))
    out = {"preset": preset, "blocks": model.num_blocks, "batch": batch}
    for path in ("official", "ours"):
        ctx = torch_path() if path == "official" else torch.no_grad()
        with torch.no_grad(), ctx:
            total, detail = _count(call, fused)
            tok = model.embed(x, t, y) if y is not None else model.embed(x, t)
            per_block = []
            for _ in range(model.num_blocks):
                n, _ = _count(lambda: per_block.append(model.block_step(tok)), fused)
                tok = per_block[-1]
                per_block[-1] = n
        out[path] = {"per_call": total, "per_block": per_block, "by_op": detail}
    # The solver update of one step (guidance doubles the batch inside the same call: no extra launches)
    sampler = DuoSampler(model, model, solver=solver, steps=10, switch=0, cuda_graphs=False)
    state = sampler.solver.init_state(x)
    eps = torch.randn_like(x)
    with torch.no_grad():
        n, _ = _count(lambda: sampler.solver.step(state, 3, x, eps), fused)
    out["solver_step"] = n
    for path in ("official", "ours"):
        out[path]["per_step"] = out[path]["per_call"] + n
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    presets = args.preset or ["uvit_cifar10_small", "dit_xl_2"]
    rows = [count(pr) for pr in presets]
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        o, u = r["official"], r["ours"]
        print(f"{r['preset']} ({r['blocks']} blocks): launches per denoiser call official {o['per_call']}, ours "
              f"{u['per_call']}; per block {o['per_block'][1]} vs {u['per_block'][1]}; per step (+ solver "
              f"{r['solver_step']}) {o['per_step']} vs {u['per_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
