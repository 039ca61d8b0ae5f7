"""Neural-process style data for the closed-form problems (the ProbConserv data recipe).

Per function (one parameter draw):

- context points: ``n_context_t`` stratified times (one uniform draw in each of ``n_context_t``
  equal bins of the time range) times ``n_context_x`` sorted uniform positions, as a tensor grid
  (every context time sees the same positions): 10 x 10 = 100 points by default;
- target points: ``n_target_t`` sorted uniform times times ``n_target_x`` sorted uniform
  positions (100 points), and the analytic mass at each target time (the right side ``b`` of the
  conservation constraint);
- the dense evaluation grid: ``n_grid_t x n_grid_x`` (201 x 201) uniform nodes in ``(t, x)``, both
  ends included, with the analytic mass of every grid time.

Points are ordered time-major: point ``i * n_x + j`` is ``(t_i, x_j)``; the last axis of
``*_x`` tensors holds ``(t, x)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._checks import check_dtype, check_int, make_generator

if TYPE_CHECKING:
    from .gpme import ClosedForm

__all__ = ["NeuralProcessData", "sample_neural_process"]

_MAX_DENSE_BYTES = 2**30


@dataclass(frozen=True)
class NeuralProcessData:
    """Context / target / dense-grid data of ``n`` functions.

    Attributes
    ----------
    params : Tensor
        shape: (n,). The parameter of each function.
    context_x : Tensor
        shape: (n, n_context_t * n_context_x, 2); columns ``(t, x)``.
    context_y : Tensor
        shape: (n, n_context_t * n_context_x, 1)
    target_x : Tensor
        shape: (n, n_target_t * n_target_x, 2)
    target_y : Tensor
        shape: (n, n_target_t * n_target_x, 1)
    target_t : Tensor
        shape: (n, n_target_t). The distinct target times, sorted.
    target_mass : Tensor
        shape: (n, n_target_t). The analytic mass at each target time.
    grid_t, grid_x : Tensor or None
        shape: (n_grid_t,), (n_grid_x,).
    grid_u : Tensor or None
        shape: (n, n_grid_t, n_grid_x). The exact solution on the dense grid.
    grid_mass : Tensor or None
        shape: (n, n_grid_t). The analytic mass at each grid time.
    """

    params: Tensor
    context_x: Tensor
    context_y: Tensor
    target_x: Tensor
    target_y: Tensor
    target_t: Tensor
    target_mass: Tensor
    grid_t: Tensor | None = None
    grid_x: Tensor | None = None
    grid_u: Tensor | None = None
    grid_mass: Tensor | None = None

    def __len__(self) -> int:
        return int(self.params.shape[0])


def _tensor_points(t: Tensor, x: Tensor) -> Tensor:
    """(n, T), (n, X) -> (n, T * X, 2) time-major."""
    n, nt = t.shape
    nx = x.shape[1]
    tt = t[:, :, None].expand(n, nt, nx)
    xx = x[:, None, :].expand(n, nt, nx)
    return torch.stack([tt, xx], dim=-1).reshape(n, nt * nx, 2)


def _values(problem: ClosedForm, params: Tensor, points: Tensor) -> Tensor:
    cls = type(problem)
    batch = cls(params[:, None])
    return batch.solution(points[..., 0], points[..., 1]).unsqueeze(-1)


def sample_neural_process(
    problem: ClosedForm,
    params: Tensor,
    *,
    seed: int | torch.Generator = 0,
    n_context_t: int = 10,
    n_context_x: int = 10,
    n_target_t: int = 10,
    n_target_x: int = 10,
    dense: bool = True,
    n_grid_t: int = 201,
    n_grid_x: int = 201,
    dtype: torch.dtype | None = None,
) -> NeuralProcessData:
    """Sample the neural-process data of the functions ``params`` of ``problem``'s family.

    Parameters
    ----------
    problem : ClosedForm
        Supplies the family, the domain and the time range.
    params : Tensor
        shape: (n,). One function per parameter.
    seed : int or torch.Generator
        All point positions come from this generator (bit-for-bit reproducible).
    dense : bool, default True
        Also evaluate the dense grid (``n * n_grid_t * n_grid_x`` values; refused above 1 GiB:
        pass ``dense=False`` for large training sets).
    dtype : torch.dtype, optional
        Of the returned tensors (default: the default dtype); values are computed in float64.
    """
    call = f"{type(problem).__name__}.neural_process_data"
    dtype = check_dtype(dtype, call)
    counts = {
        "n_context_t": n_context_t,
        "n_context_x": n_context_x,
        "n_target_t": n_target_t,
        "n_target_x": n_target_x,
        "n_grid_t": n_grid_t,
        "n_grid_x": n_grid_x,
    }
    counts = {k: check_int(v, k, call) for k, v in counts.items()}
    if not isinstance(dense, bool):
        raise TypeError(f"{call}: dense must be a bool, got {type(dense).__name__}.")
    gen = make_generator(seed, call)
    n = params.shape[0]
    t0, t1 = problem.t_range
    x0, x1 = problem.domain
    f64 = torch.float64

    # context: stratified times x sorted uniform positions
    nct, ncx = counts["n_context_t"], counts["n_context_x"]
    bins = torch.arange(nct, dtype=f64)
    ct = t0 + (t1 - t0) * (bins + torch.rand(n, nct, generator=gen, dtype=f64)) / nct
    cx = x0 + (x1 - x0) * torch.rand(n, ncx, generator=gen, dtype=f64).sort(dim=1).values
    # targets: sorted uniform times x sorted uniform positions
    ntt, ntx = counts["n_target_t"], counts["n_target_x"]
    tt = t0 + (t1 - t0) * torch.rand(n, ntt, generator=gen, dtype=f64).sort(dim=1).values
    tx = x0 + (x1 - x0) * torch.rand(n, ntx, generator=gen, dtype=f64).sort(dim=1).values

    context_x = _tensor_points(ct, cx)
    target_x = _tensor_points(tt, tx)
    context_y = _values(problem, params, context_x)
    target_y = _values(problem, params, target_x)
    batch = type(problem)(params[:, None])
    target_mass = batch.mass(tt)

    grid_t = grid_x = grid_u = grid_mass = None
    if dense:
        size = n * counts["n_grid_t"] * counts["n_grid_x"] * torch.empty((), dtype=dtype).itemsize
        if size > _MAX_DENSE_BYTES:
            raise ValueError(
                f"{call}: the dense grid of {n} functions would take {size / 2**30:.1f} GiB; pass "
                "dense=False (e.g. for a training set) or fewer functions."
            )
        grid_t = torch.linspace(t0, t1, counts["n_grid_t"], dtype=f64)
        grid_x = torch.linspace(x0, x1, counts["n_grid_x"], dtype=f64)
        grid_u = type(problem)(params).on_grid(grid_t, grid_x)
        grid_mass = batch.mass(grid_t[None, :])
        grid_t, grid_x, grid_u, grid_mass = (
            v.to(dtype) for v in (grid_t, grid_x, grid_u, grid_mass)
        )
    return NeuralProcessData(
        params=params.to(dtype),
        context_x=context_x.to(dtype),
        context_y=context_y.to(dtype),
        target_x=target_x.to(dtype),
        target_y=target_y.to(dtype),
        target_t=tt.to(dtype),
        target_mass=target_mass.to(dtype),
        grid_t=grid_t,
        grid_x=grid_x,
        grid_u=grid_u,
        grid_mass=grid_mass,
    )
