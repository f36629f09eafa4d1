import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, so it has to be set before any test
# module imports a kernel. Without a GPU every Triton kernel runs under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny tensors: one thread avoids oversubscription overheads (up to 50x on a loaded 2-core machine).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
