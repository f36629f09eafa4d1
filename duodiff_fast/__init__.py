"""duodiff-fast: sample diffusion transformers faster with a shallow-then-deep (DuoDiff) schedule."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import duodiff_fast` stays cheap (no triton import, no extension probing).
    if name in ("DuoSampler", "AtTimestep", "EarlyExitSampler", "profile_exits", "calibrate_switch"):
        from . import sampling
        return getattr(sampling, name)
    if name in ("UViT", "DiT", "EarlyExitModel", "create_model", "load_checkpoint"):
        from . import models
        return getattr(models, name)
    raise AttributeError(f"module 'duodiff_fast' has no attribute {name!r}")


__all__ = ["DuoSampler", "AtTimestep", "EarlyExitSampler", "profile_exits", "calibrate_switch", "UViT", "DiT",
           "EarlyExitModel", "create_model", "load_checkpoint", "__version__"]
