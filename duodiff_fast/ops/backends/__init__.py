"""Fast backends of `duodiff_fast.ops`, one module each; importing a module registers its implementations.

Adding a backend: one module here holding one `Impl` subclass per op it implements (the class that
answers `not_supported_reasons` also runs the op), plus its name in `BACKEND_MODULES` below and in
`_registry.BACKEND_NAMES`.
"""
import importlib

BACKEND_MODULES = ("triton", "cuda")

for _name in BACKEND_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
