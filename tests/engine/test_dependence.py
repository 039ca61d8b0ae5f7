"""Redundant rows are accepted at every size, judged at the dtype's rounding; rows whose values
disagree raise, naming them (issue 18, engine)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers._engine.dependence import independent_rows
from constraint_layers._tolerance import tolerance
from constraint_layers.errors import IncompatibleConstraintsError

F64 = torch.float64
DTYPES = (torch.float32, torch.float64)
SIZES = range(5, 41)


class VarianceHead(nn.Module):
    """A Gaussian output: the input as the mean, a positive variance."""

    def forward(self, x):
        return x, 0.5 + x.square()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _worst(y: torch.Tensor, G: torch.Tensor, b: torch.Tensor) -> float:
    """The largest residual of ``G y = b``, relative to the terms each row balances."""
    u = y.detach().reshape(y.shape[0], -1).to(F64)
    G = G.to(F64)
    r = (u @ G.mT - b.to(F64)).abs()
    size = u.abs() @ G.abs().mT + b.to(F64).abs()
    return float((r / size).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_same_agreeing_row_twice_at_every_n(dtype):
    for n in SIZES:
        for row in (torch.ones(1, n), torch.randn(1, n, generator=_gen(n))):
            C = cl.Conservation(row.to(dtype), torch.tensor([1.0], dtype=dtype))
            x = torch.randn(3, n, dtype=dtype, generator=_gen(100 + n))
            once = cl.wrap(nn.Identity(), C)(x)
            twice = cl.wrap(nn.Identity(), C, C)(x)
            tol = tolerance(dtype)
            assert _worst(twice, C.G, torch.ones(3, 1)) <= tol.residual, (n, dtype)
            torch.testing.assert_close(twice, once, rtol=tol.reference, atol=tol.reference * 10)
            mean, _ = cl.wrap(VarianceHead(), C, C)(x)  # the Gaussian path
            assert _worst(mean, C.G, torch.ones(3, 1)) <= tol.residual, (n, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_same_total_twice_with_walls_at_every_n(dtype):
    for n in SIZES:
        total = cl.Conservation.integral(0.3)
        x = torch.randn(2, 1, n, dtype=dtype, generator=_gen(n))
        for head in (nn.Identity(), VarianceHead()):
            out = cl.wrap(head, cl.Neumann(0.0), total, total)(x)
            y = out[0] if isinstance(out, tuple) else out
            err = cl.metrics.conservation_error(y, total).abs().max()
            assert float(err) <= 10 * tolerance(dtype).residual, (n, dtype, head)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_that_repeat_a_dirichlet_wall(dtype):
    for n in SIZES:
        ends = torch.zeros(2, n, dtype=dtype)
        ends[0, 0] = 1.0
        ends[1, -1] = 2.0  # a multiple of the wall row: the same constraint
        rows = cl.Conservation(ends, torch.tensor([0.5, 1.0], dtype=dtype))
        x = torch.randn(2, 1, n, dtype=dtype, generator=_gen(n))
        for head in (nn.Identity(), VarianceHead()):
            out = cl.wrap(head, cl.Dirichlet(0.5), rows)(x)
            y = out[0] if isinstance(out, tuple) else out
            assert torch.equal(y[..., 0], torch.full_like(y[..., 0], 0.5)), (n, dtype)
            assert torch.equal(y[..., -1], torch.full_like(y[..., -1], 0.5)), (n, dtype)
        bad = cl.Conservation(ends, torch.tensor([0.5, 2.0], dtype=dtype))  # 2 * 0.5 != 2.0
        with pytest.raises(IncompatibleConstraintsError, match=r"Conservation\(G: \(2, "):
            cl.wrap(nn.Identity(), cl.Dirichlet(0.5), bad)(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_that_combines_two_others(dtype):
    for n in SIZES:
        g = torch.randn(2, n, dtype=dtype, generator=_gen(n))
        b = torch.randn(2, dtype=dtype, generator=_gen(200 + n))
        G = torch.cat([g, g[:1] + 2 * g[1:]])  # formed in the test's dtype: dependent to rounding
        B = torch.cat([b, b[:1] + 2 * b[1:]])
        x = torch.randn(3, n, dtype=dtype, generator=_gen(300 + n))
        for cons in (
            [cl.Conservation(G, B)],
            [cl.Conservation(g, b), cl.Conservation(G[2:], B[2:])],
        ):
            y = cl.wrap(nn.Identity(), *cons)(x)
            assert _worst(y, G, B.expand(3, 3)) <= tolerance(dtype).residual, (n, dtype)
            mean, _ = cl.wrap(VarianceHead(), *cons)(x)
            assert _worst(mean, G, B.expand(3, 3)) <= tolerance(dtype).residual, (n, dtype)
        off = cl.Conservation(G[2:], B[2:] + 1.0)
        with pytest.raises(IncompatibleConstraintsError, match="cannot hold together"):
            cl.wrap(nn.Identity(), cl.Conservation(g, b), off)(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inconsistent_duplicates_raise_and_name_them(dtype):
    for n in (5, 7, 8, 10, 15, 19, 28, 32, 34, 40):
        row = torch.ones(1, n, dtype=dtype)
        a = cl.Conservation(row, torch.tensor([1.0], dtype=dtype))
        c = cl.Conservation(row, torch.tensor([2.0], dtype=dtype))
        x = torch.randn(2, n, dtype=dtype)
        for head in (nn.Identity(), VarianceHead()):
            with pytest.raises(IncompatibleConstraintsError) as info:
                cl.wrap(head, a, c)(x)
            assert rf"Conservation(G: (1, {n}), b=tensor(1,)) row 0" in str(info.value)
            assert info.value.rows == (0, 1)
        with pytest.raises(IncompatibleConstraintsError, match="cannot hold together"):
            total = cl.Conservation.integral
            cl.wrap(nn.Identity(), cl.Neumann(0.0), total(1.0), total(2.0))(x.unsqueeze(1))


def test_decisions_are_at_rounding_not_at_conditioning():
    """Rows far apart from dependence but close to each other (an angle of 1e-6) stay two rows;
    rows dependent to rounding are merged; the decision is the same for every scale."""
    n = 30
    g = torch.randn(1, n, dtype=F64, generator=_gen(0))
    e = torch.randn(1, n, dtype=F64, generator=_gen(1))
    near = torch.cat([g, g + 1e-6 * e])
    b = torch.tensor([[1.0, 1.0]], dtype=F64)
    G2, _ = independent_rows(near, b, ["a", "b"], "t")
    assert G2 is near
    for scale in (1e-150, 1e-8, 1.0, 1e8, 1e150):
        dup = torch.cat([g, g]) * scale
        G1, b1 = independent_rows(dup, b * scale, ["a", "b"], "t")
        assert G1.shape == (1, n)
        torch.testing.assert_close(b1 @ G1, b[:, :1] * g / g.norm().square(), rtol=1e-12, atol=0)
        with pytest.raises(IncompatibleConstraintsError):
            independent_rows(
                dup, torch.tensor([[1.0, 1.0 + 1e-9]], dtype=F64) * scale, ["a", "b"], "t"
            )


def test_zero_rows_are_redundant_when_their_value_is_zero():
    G = torch.zeros(2, 6, dtype=F64)
    G[0, 1] = 1.0
    G2, b2 = independent_rows(G, torch.tensor([[3.0, 0.0]], dtype=F64), ["a", "b"], "t")
    assert G2.shape == (1, 6) and torch.allclose(b2 @ G2, 3.0 * G[:1])
    with pytest.raises(IncompatibleConstraintsError, match="b"):
        independent_rows(G, torch.tensor([[3.0, 1e-3]], dtype=F64), ["a", "b"], "t")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_given_per_sample_twice(dtype):
    for n in SIZES:
        G = torch.randn(2, 1, n, dtype=dtype, generator=_gen(n))  # one row per sample
        C = cl.Conservation(G, torch.tensor([1.0], dtype=dtype))
        x = torch.randn(2, n, dtype=dtype, generator=_gen(50 + n))
        for head in (nn.Identity(), VarianceHead()):
            out = cl.wrap(head, C, C)(x)
            y = out[0] if isinstance(out, tuple) else out
            for s in range(2):
                assert _worst(y[s : s + 1], G[s], torch.ones(1, 1)) <= tolerance(dtype).residual
        bad = cl.Conservation(G, torch.tensor([2.0], dtype=dtype))
        with pytest.raises(IncompatibleConstraintsError, match="cannot hold together"):
            cl.wrap(nn.Identity(), C, bad)(x)
