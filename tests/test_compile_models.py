"""torch.compile(fullgraph=True) of whole models with the library's ops: no graph break inside a block.

On CPU the Triton ops run under the interpreter (their custom ops are opaque to the compiler, which only
needs their fake implementations) and Inductor's C++ codegen would take minutes on two cores, so the
graphs are built with the aot_eager backend; the point is that Dynamo captures the model in one graph.
"""
import os

import pytest
import torch

from duodiff_fast.models import create_model

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SPECS = {
    "uvit": {"family": "uvit", "kwargs": dict(img_size=8, patch_size=2, embed_dim=64, depth=3, num_heads=2,
                                              num_classes=5), "time_convention": "frac1000",
             "schedule": {"name": "linear"}},
    "dit": {"family": "dit", "kwargs": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                            num_heads=2, num_classes=5), "time_convention": "int",
            "schedule": {"name": "linear"}},
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("family", sorted(SPECS))
def test_model_compiles_in_one_graph(family, backend, monkeypatch):
    if backend == "triton" and not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs a GPU or the Triton interpreter")
    monkeypatch.setenv("DUODIFF_BACKEND", backend)
    torch.manual_seed(0)
    m = create_model(SPECS[family]).eval()
    for p in m.parameters():  # adaLN-Zero zeros would make the comparison trivial
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, m.in_channels, 8, 8)
    t, y = torch.tensor([3.0, 400.0]), torch.tensor([1, 2])
    torch._dynamo.reset()
    targets = []

    def recording(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(m, fullgraph=True, backend=recording)  # raises on any graph break
    with torch.no_grad():
        got, want = compiled(x, t, y), m(x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ours = [tg for tg in targets if tg.startswith("duodiff.")]
    if backend == "triton":
        assert any("attention" in tg for tg in ours) and len(ours) >= 3, ours
    else:
        assert not ours
