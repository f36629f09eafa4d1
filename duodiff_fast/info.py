"""`python -m duodiff_fast.info`: what this machine runs and which backend each op would use.

Prints versions (python, torch, CUDA, triton), devices, whether the CUDA extension `duodiff_fast._C` is
built (and for which archs), the environment switches, and for each op on a typical input the chosen
backend with every other backend's reasons not to run. `--json` prints `collect()` as JSON.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys

import torch

ENV_VARS = ("TRITON_INTERPRET", "DUODIFF_BACKEND", "CUDA_VISIBLE_DEVICES", "DUODIFF_CUDA_ARCHS")


def _dist_version(name: str) -> str | None:
    # Metadata only: optional peers (flash-attn, xformers) are not imported just to be listed.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _typical_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    """One model-like input per op (U-ViT-S widths; DiT's chunked adaLN output), from the op registry."""
    from .ops import SPECS
    return {op: next(iter(spec.examples(device, dtype, "typical").values())) for op, spec in SPECS.items()}


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} on {t.device}"


def collect() -> dict:
    """Everything `main()` prints, as plain data."""
    from . import __version__, _cpp_lib, ops

    info = {
        "duodiff_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _dist_version("triton"),
        "flash_attn": _dist_version("flash-attn") or _dist_version("flash_attn"),
        "xformers": _dist_version("xformers"),
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "extension": _cpp_lib.status(),
        "ops": {},
    }
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1),
                                "sms": p.multi_processor_count})
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    info["typical_device"], info["typical_dtype"] = str(device), str(dtype).replace("torch.", "")
    for op, args in _typical_inputs(device, dtype).items():
        tensors = args[:len(ops.SPECS[op].inputs)]
        ex = ops.explain(op, *tensors)
        entry = {"input": _describe(args[0]), "chosen": ex["chosen"], "forced_by": ex["forced_by"],
                 "reasons": ex["reasons"]}
        if "error" in ex:
            entry["error"] = ex["error"]
        info["ops"][op] = entry
    return info


def format_info(info: dict) -> str:
    ext = info["extension"]
    if ext["loaded"]:
        how = {"jit": "JIT-built on first use", "setup.py": "built by setup.py"}.get(ext.get("source"), "built")
        ext_line = f"{how} for sm_{', sm_'.join(ext['archs']) or '?'} ({ext['path']})"
        if ext["missing_ops"]:
            ext_line += f"; missing {', '.join(ext['missing_ops'])}"
    elif ext["built"]:
        ext_line = f"present but unusable: {ext['error']}"
    else:
        jit = ext.get("jit") or {}
        why = f"; no JIT build: {jit['reason']}" if jit.get("reason") and not jit.get("attempted") else ""
        ext_line = f"not built{why} ({ext['hint']})"
    lines = [
        f"duodiff_fast {info['duodiff_fast']}",
        f"python       {info['python']} ({info['platform']})",
        (f"torch        {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'}, "
         f"cuDNN {info['cudnn'] or 'none'})"),
        f"triton       {info['triton'] or 'not installed'}",
        f"flash-attn   {info['flash_attn'] or 'not installed'}",
        f"xformers     {info['xformers'] or 'not installed'}",
        f"_C extension {ext_line}",
        "devices      " + ("; ".join(f"cuda:{d['index']} {d['name']} (sm {d['capability']}, "
                                     f"{d['memory_gib']} GiB, {d['sms']} SMs)" for d in info["devices"])
                           or "no CUDA device (CPU only)"),
        "environment  " + (", ".join(f"{k}={v}" for k, v in info["env"].items() if v is not None) or "-"),
        "",
        f"backend per op (typical {info['typical_dtype']} input on {info['typical_device']}):",
    ]
    width = max(len(op) for op in info["ops"])
    for op, e in info["ops"].items():
        chosen = e["chosen"] or "ERROR"
        how = "" if e["forced_by"] == "automatic" else f", forced by {e['forced_by']}"
        lines.append(f"  {op:<{width}}  -> {chosen}  ({e['input']}{how})")
        if "error" in e:
            lines.append(f"  {'':<{width}}     {e['error'].splitlines()[0]}")
        for name, reasons in e["reasons"].items():
            if name != e["chosen"] and reasons:
                lines.append(f"  {'':<{width}}     not {name}: {'; '.join(reasons)}")
    if not info["cuda_available"]:
        if info["env"]["TRITON_INTERPRET"] == "1":
            lines += ["", ("No GPU here: the Triton backend runs in the interpreter (TRITON_INTERPRET=1; "
                           "slow, for testing).")]
        else:
            lines += ["", ("No GPU here: ops run on torch; TRITON_INTERPRET=1 runs the Triton kernels in the "
                           "interpreter (slow, for testing).")]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duodiff_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the collected data as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
