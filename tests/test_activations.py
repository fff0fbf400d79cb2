import pytest
import torch
from torch.nn import functional as F

from diffrl.nets.activations import Mish, mish


def test_mish_matches_torch_values_and_gradients():
    x = torch.cat([torch.linspace(-60.0, 60.0, 2001, dtype=torch.float64), torch.randn(500, dtype=torch.float64)])
    x.requires_grad_(True)
    ours, ref = mish(x), F.mish(x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(mish, (torch.randn(20, dtype=torch.float64, requires_grad=True),))


def test_mish_float32_extremes_and_no_grad_path():
    x = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    with torch.no_grad():
        y = mish(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, F.mish(x), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace is what Policy.export uses
def test_mish_module_traces_to_plain_ops():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), Mish())
    x = torch.randn(5, 3)
    traced = torch.jit.trace(module, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), module(x))
    assert "prim::PythonOp" not in str(traced.graph)
