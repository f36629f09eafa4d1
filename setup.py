"""Build script. Pure Python unless a CUDA build of torch and nvcc are both present.

Environment switches (DESIGN.md §5):
  DUODIFF_SKIP_CUDA_BUILD=1   never build duodiff_fast._C (here, and not JIT on first use either)
  DUODIFF_FORCE_CUDA_BUILD=1  build it even without a visible GPU (needs a CUDA torch and nvcc)
  DUODIFF_CUDA_ARCHS="80;90a" target architectures
The compiler flags live in duodiff_fast/_cpp_lib.py (shared with the JIT build and the offline check);
`pip install -e . --no-build-isolation` builds csrc/ with ninja (MAX_JOBS caps the parallel jobs).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE_FOR_FIND = os.path.dirname(os.path.abspath(__file__))

# Every package under duodiff_fast/ (found, so a new subpackage is never left out of a wheel), plus kernels/.
PACKAGES = sorted(find_packages(HERE_FOR_FIND, include=["duodiff_fast", "duodiff_fast.*"])) + [
    "duodiff_fast.assets",  # data only (no __init__.py): listed by hand
    "duodiff_fast.kernels"]
PACKAGE_DIR = {"duodiff_fast.kernels": "kernels"}
# Shipped weights (proxy-FID classifier, demo pair): small safetensors files, read offline.
PACKAGE_DATA = {"duodiff_fast.assets": ["*.safetensors", "*.json"],
                # the measured cuda-vs-triton dispatch order (ops/_registry.py reads it at run time)
                "duodiff_fast.ops": ["*.json"]}


HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(env, name):
    return env.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_sources():
    csrc = os.path.join(HERE, "csrc")  # top level only: csrc/emu/ is the test emulator, not the extension
    return sorted(glob.glob(os.path.join(csrc, "*.cu"))) + sorted(glob.glob(os.path.join(csrc, "*.cpp")))


def cuda_build_plan(env=None, sources=None):
    """Return (build, reason). Imports torch only when it is already importable (never installs it)."""
    env = os.environ if env is None else env
    if _flag(env, "DUODIFF_SKIP_CUDA_BUILD"):
        return False, "DUODIFF_SKIP_CUDA_BUILD is set"
    sources = cuda_sources() if sources is None else sources
    if not sources:
        return False, "no sources in csrc/"
    try:
        import torch  # present only with --no-build-isolation
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False, "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc not found"
    if not torch.cuda.is_available() and not _flag(env, "DUODIFF_FORCE_CUDA_BUILD"):
        return False, "no visible GPU (set DUODIFF_FORCE_CUDA_BUILD=1 to build anyway)"
    return True, "CUDA torch and nvcc found"


def load_build_settings():
    """duodiff_fast/_cpp_lib.py loaded by path (stdlib-only at import): the flags the JIT build and the
    offline check (bench/csrc_report.py) use too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("duodiff_cpp_lib", os.path.join(HERE, "duodiff_fast", "_cpp_lib.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def extension_kwargs(archs, torch_version, torch_cuda):
    """CUDAExtension keywords for duodiff_fast._C (pure data: tested without a CUDA toolchain)."""
    cfg = load_build_settings()
    if not cfg.parse_archs(archs):
        raise ValueError(f"{cfg.ENV_ARCHS}={archs!r} names no architecture (e.g. '80;90a')")
    return {
        "name": "duodiff_fast._C",
        "sources": [os.path.relpath(str(p), HERE) for p in cfg.source_paths()],
        "include_dirs": [os.path.join(HERE, "csrc")],
        "define_macros": cfg.build_macros(archs, torch_version, torch_cuda),
        "extra_compile_args": {"cxx": list(cfg.CXX_FLAGS), "nvcc": list(cfg.NVCC_FLAGS) + cfg.gencode_flags(archs)},
    }


def ext_modules_and_cmdclass():
    build, reason = cuda_build_plan()
    if not build:
        print(f"duodiff-fast: not building the CUDA extension: {reason}")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("DUODIFF_CUDA_ARCHS", "80;90a")
    print(f"duodiff-fast: building the CUDA extension for sm_{archs} ({reason})")
    ext = CUDAExtension(**extension_kwargs(archs, torch.__version__, torch.version.cuda))
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for cuda_build_plan
    ext_modules, cmdclass = ext_modules_and_cmdclass()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=ext_modules, cmdclass=cmdclass)
