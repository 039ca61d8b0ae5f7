"""The grid a wrapper is given is the grid of every constraint; a conflicting one raises
(issue 18, engine: the extent case)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers.errors import GridError

F64 = torch.float64


class VarianceHead(nn.Module):
    def forward(self, x):
        return x, 0.5 + x.square()


def _integral(y: torch.Tensor, extent: float, dim: int = -1) -> torch.Tensor:
    """The trapezoid integral over [0, extent] along ``dim``, by torch's own rule."""
    n = y.shape[dim]
    x = torch.linspace(0.0, extent, n, dtype=F64)
    return torch.trapezoid(y.to(F64), x, dim=dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_walls_and_total_on_the_wrappers_extent(dtype):
    total = cl.Conservation.integral(1.0)
    x = torch.randn(3, 1, 33, dtype=dtype, generator=torch.Generator().manual_seed(0))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for head, extra in (
        (nn.Identity(), ()),
        (VarianceHead(), ()),
        (nn.Identity(), (cl.Bounds(lower=-1.0),)),
    ):
        out = cl.wrap(head, cl.Neumann(0.0), total, *extra, extent=2.0)(x)
        y = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(_integral(y, 2.0), torch.ones(3, 1, dtype=F64), rtol=0, atol=tol)
    assert total.extent == (None,)  # the user's constraint is not changed


def test_fixed_spacing_and_per_axis_extents_reach_the_integral():
    x = torch.randn(2, 1, 9, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = cl.wrap(nn.Identity(), cl.Dirichlet(0.0, dim=0), cl.Conservation.integral(1.0, dim=0),
                spacing=0.25)(x)  # fmt: skip
    torch.testing.assert_close(_integral(y, 2.0, dim=2), torch.ones(2, 1, 5, dtype=F64))
    for dim in (1, -1):
        c = cl.Conservation.integral(3.0, dim=dim)
        y = cl.wrap(nn.Identity(), cl.Neumann(0.0, dim=1), c, extent=(2.0, 4.0))(x)
        torch.testing.assert_close(_integral(y, 4.0, dim=3), torch.full((2, 1, 9), 3.0, dtype=F64))


def test_a_periodic_grid_without_its_end_node():
    x = torch.randn(2, 1, 16, dtype=F64, generator=torch.Generator().manual_seed(2))
    c = cl.Conservation.integral(1.0)
    y = cl.wrap(nn.Identity(), c, extent=2.0, endpoint=False)(x)
    torch.testing.assert_close(y.sum(-1) * (2.0 / 16), torch.ones(2, 1, dtype=F64))
    assert c.endpoint  # the user's constraint is not changed


def test_an_integral_that_states_the_same_grid_is_kept():
    x = torch.randn(2, 1, 17, dtype=F64)
    c = cl.Conservation.integral(1.0, extent=2.0)
    y = cl.wrap(nn.Identity(), cl.Neumann(0.0), c, extent=2.0)(x)
    torch.testing.assert_close(_integral(y, 2.0), torch.ones(2, 1, dtype=F64))
    y = cl.wrap(nn.Identity(), cl.Neumann(0.0), c)(x)  # no grid given to wrap: the integral's
    torch.testing.assert_close(_integral(y, 2.0), torch.ones(2, 1, dtype=F64))


def test_a_conflicting_grid_raises_and_names_both():
    walls = cl.Neumann(0.0)
    cases = [
        (cl.Conservation.integral(1.0, extent=1.0), {"extent": 2.0}, r"extent=1\.0.*extent=2\.0"),
        (cl.Conservation.integral(1.0, spacing=0.1), {"extent": 2.0}, r"spacing=0\.1.*extent=2\.0"),
        (
            cl.Conservation.integral(1.0, spacing=0.1),
            {"spacing": 0.2},
            r"spacing=0\.1.*spacing=0\.2",
        ),
        (cl.Conservation.integral(1.0, grid=torch.linspace(0, 2, 9)), {"extent": 2.0}, "grid="),
        (cl.Conservation.integral(1.0, endpoint=False), {"extent": 2.0}, "endpoint=False"),
    ]
    for c, grid, match in cases:
        with pytest.raises(GridError, match=r"ConstraintLayer: .*" + match.split(".*")[0]) as info:
            cl.wrap(nn.Identity(), walls, c, **grid)
        assert "grid given to wrap is the grid of every constraint" in str(info.value)
        with pytest.raises(GridError, match=match):
            cl.wrap(nn.Identity(), walls, c, **grid)
