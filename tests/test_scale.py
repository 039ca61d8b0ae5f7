"""Going past one process: DistributedDataParallel and torch.compile serve a wrapped model as is."""

from __future__ import annotations

import time
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
    # torch's spawn + gloo file store sometimes stalls before the worker runs (seen here: a
    # spawned process stuck in spawn._wrap with no Python frame of the worker, in 2 to 4 of 10
    # runs). A stalled start is retried with a fresh store; the checks below are unchanged.
    for attempt in range(5):
        store = tmp_path / f"store{attempt}"
        ctx = mp.spawn(w.worker, args=(2, str(store), str(out)), nprocs=2, join=False)
        deadline = time.monotonic() + 45
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                break
        else:
            break
    else:
        pytest.fail("the DDP workers stalled in 5 starts of 45 s each")
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
