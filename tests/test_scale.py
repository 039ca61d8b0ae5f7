"""Going past one process: DistributedDataParallel and torch.compile serve a wrapped model as is."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.multiprocessing as mp

import constraint_layers as cl
from constraint_layers.testing import relative_residual


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_processes_same_gradients_and_exact_after_step(tmp_path):
    import _ddp_worker as w

    out = tmp_path / "ddp.pt"
    mp.spawn(w.worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    single = w.build()
    x, y = w.data()
    (single(x) - y).pow(2).mean().backward()
    for g_ddp, p in zip(got["grads"], single.parameters()):
        assert torch.allclose(g_ddp, p.grad, rtol=1e-5, atol=1e-7)
    torch.optim.SGD(single.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert torch.allclose(got["after"], single(x), rtol=1e-5, atol=1e-6)
    assert relative_residual(got["after"], single.bcs) <= 1e-5


def test_torch_compile_matches_eager():
    from _models import fno

    torch.manual_seed(0)
    bcs = [
        cl.Dirichlet(torch.linspace(0, 1, 6), dim=0, side="low"),
        cl.Neumann(2.0, dim=0, side="high"),
    ]
    model = cl.wrap(fno((4, 3), in_channels=2), *bcs)
    x = torch.randn(2, 2, 24, 6)
    eager = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model)
        out = compiled(x)
    assert torch.allclose(out, eager, rtol=1e-4, atol=1e-5)
    assert relative_residual(out, bcs) <= 1e-5
    out.sum().backward()  # and it trains
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
