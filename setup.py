"""Build script. Pure Python unless a CUDA build of torch and nvcc are both present.

Environment switches (DESIGN.md §5):
  DUODIFF_SKIP_CUDA_BUILD=1   never build duodiff_fast._C
  DUODIFF_FORCE_CUDA_BUILD=1  build it even without a visible GPU (needs a CUDA torch and nvcc)
  DUODIFF_CUDA_ARCHS="80;90a" target architectures
"""
import glob
import os
import shutil

from setuptools import setup

PACKAGES = [
    "duodiff_fast", "duodiff_fast.models", "duodiff_fast.ops", "duodiff_fast.sampling",
    "duodiff_fast.kernels", "duodiff_fast.assets",
]
PACKAGE_DIR = {"duodiff_fast.kernels": "kernels"}
# Shipped weights (proxy-FID classifier, demo pair): small safetensors files, read offline.
PACKAGE_DATA = {"duodiff_fast.assets": ["*.safetensors", "*.json"]}


HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(env, name):
    return env.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_sources():
    csrc = os.path.join(HERE, "csrc")
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
        import torch  # noqa: F401  (present only with --no-build-isolation)
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


def ext_modules_and_cmdclass():
    build, reason = cuda_build_plan()
    if not build:
        print(f"duodiff-fast: not building the CUDA extension: {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("DUODIFF_CUDA_ARCHS", "80;90a")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    sources = [os.path.relpath(p, HERE) for p in cuda_sources()]
    ext = CUDAExtension(
        name="duodiff_fast._C",
        sources=sources,
        define_macros=[("DUODIFF_CUDA_ARCHS", f'"{archs}"')],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-Xptxas=--warn-on-spills", "-lineinfo"] + gencode,
        },
    )
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for cuda_build_plan
    ext_modules, cmdclass = ext_modules_and_cmdclass()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=ext_modules, cmdclass=cmdclass)
