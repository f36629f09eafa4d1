"""Public ops with backend dispatch, declared once each in an op registry.

Layout (DESIGN.md §3): `_registry.py` holds the registry and the dispatcher; each op is declared once in
its own module (`attention.py`, `norm.py` for the four norm-family ops, `exit_confidence.py`): public
function, validation, fake, float64 `<op>_ref`, torch implementation, example inputs at the benchmark
shapes and the FLOP/byte model. Fast backends register their implementations in `backends/<name>.py`
(`triton`: `duodiff_fast.kernels`, on CPU only under TRITON_INTERPRET=1; `cuda`: the compiled `_C`).
Automatic choice takes the first backend that can run the inputs (Triton before CUDA unless a measured
order for the running GPU says otherwise, torch last); `backend=` (or `DUODIFF_BACKEND`) forces one and
raises if it cannot. Inputs that require grad with grad mode on go to torch: the fast kernels are
inference-only. Inputs are validated once per call, by the public function, whatever the backend.

torch.library registration. Each public function validates its inputs, chooses a backend in Python (at
trace time under torch.compile, where the choice is a constant), then:
- torch: runs plain torch code, which torch.compile traces and fuses like any other torch code and
  autograd differentiates;
- triton / cuda: calls one registered op per public function, `torch.ops.duodiff.<op>(..., backend)`,
  with the backend name as a string argument. One op per function (rather than per backend) keeps the
  graph readable and the fake impl in one place; the string costs nothing since it is a constant.
The ops use `torch.library.custom_op` + `register_fake`, not `triton_op` + `wrap_triton`: with torch
2.13 (CPU) and triton 3.9 the interpreter touches fake tensors' data inside torch.compile, while an
opaque custom op with a fake impl compiles with fullgraph=True on CPU and on CUDA alike, and is captured
by CUDA Graphs since the kernels launch on the current stream without host syncs. The price is that
Inductor cannot fuse into our kernels, which are already fused. Outside tracing the implementation is
called directly, skipping the dispatcher's per-call overhead (tens of microseconds).
"""
from . import _registry
from ._registry import BACKEND_NAMES, IMPLS, implementations, priority
from .attention import attention, attention_op, attention_ref, attention_sdpa
from .norm import (
    adaln,
    adaln_op,
    adaln_ref,
    add_layer_norm,
    add_layer_norm_op,
    add_layer_norm_ref,
    gated_adaln,
    gated_adaln_op,
    gated_adaln_ref,
    layer_norm,
    layer_norm_op,
    layer_norm_ref,
)
from .exit_confidence import exit_confidence, exit_confidence_op, exit_confidence_ref  # noqa: E402  (after the norm family: declaration order)
from . import backends  # noqa: E402,F401  (registers the triton and cuda implementations)

OPS = tuple(_registry.OPS)  # op names, in declaration order
SPECS = _registry.OPS       # name -> OpSpec


def select_backend(op, *inputs, backend=None):
    """Name of the backend that `op` would use for these tensor inputs (in the op's argument order).

    >>> select_backend("attention", qkv)                  # 'triton' on a GPU, 'torch' on a CPU
    >>> select_backend("adaln", x, shift, scale, backend="cuda")  # raises ValueError if it cannot run
    """
    _registry._check_op(op)
    return _registry.choose(op, SPECS[op].inputs, inputs, backend)


def explain(op, *inputs, backend=None):
    """For `python -m duodiff_fast.info`: the chosen backend and every backend's reasons not to run.

    Returns {"op", "chosen", "forced_by", "reasons": {backend: [reason, ...]}} ("chosen" is None and
    "error" is set when a forced backend cannot run).
    """
    _registry._check_op(op)
    inp = _registry.describe(op, SPECS[op].inputs, inputs)
    forced, source = _registry.forced_backend(op, backend)
    out = {"op": op, "chosen": None, "forced_by": source, "reasons": _registry.all_reasons(inp)}
    try:
        out["chosen"] = _registry.select(inp, forced, source)
    except ValueError as e:
        out["error"] = str(e)
    return out


__all__ = [
    "adaln_op",
    "add_layer_norm_op",
    "attention_op",
    "exit_confidence_op",
    "gated_adaln_op",
    "layer_norm_op",
    "BACKEND_NAMES",
    "IMPLS",
    "OPS",
    "SPECS",
    "adaln",
    "adaln_ref",
    "add_layer_norm",
    "add_layer_norm_ref",
    "attention",
    "attention_ref",
    "attention_sdpa",
    "exit_confidence",
    "exit_confidence_ref",
    "explain",
    "gated_adaln",
    "gated_adaln_ref",
    "implementations",
    "layer_norm",
    "layer_norm_ref",
    "priority",
    "select_backend",
]
