"""Test helpers shipped with the library: dense references and a test mixin for constraint layers.

Adapter authors get the same checks the library runs on its own wrappers: subclass
:class:`BoundaryLayerChecks` (boundary conditions) or :class:`ConservationLayerTests`
(conservation), say how to build the model, its input and the constraints, and pytest collects the
checks (residual, non-vacuity, agreement with a dense float64 projection,
idempotence, gradients, batching, dtypes, ``state_dict`` round trip, ``unwrap`` identity, no
mutation of the caller's tensors).

Example
-------
>>> import torch, constraint_layers as cl
>>> from constraint_layers.testing import BoundaryLayerChecks
>>> class TestMyConv(BoundaryLayerChecks):          # collected by pytest (name starts with Test)
...     def make_model(self, dtype):
...         return torch.nn.Conv1d(2, 1, 5, padding=2).to(dtype)
...     def make_input(self, batch, dtype):
...         return torch.randn(batch, 2, 40, dtype=dtype)
...     def conditions(self):
...         return [cl.Dirichlet(1.0, side="low"), cl.Neumann(0.5, side="high", order=3)]
>>> TestMyConv().test_matches_dense_reference()
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..boundary.enforce import boundary_residuals, boundary_rows
from .._grid import resolve_spacing
from .conservation import ConservationLayerTests, dense_update
from ..errors import GridError

__all__ = [
    "RESIDUAL_TOL",
    "BoundaryLayerChecks",
    "ConservationLayerTests",
    "dense_update",
    "reference_enforce",
    "relative_residual",
]

#: Relative residual tolerance of the exactness checks, by dtype (architecture.md: float32 about
#: 1e-5 relative, float64 about 1e-12).
RESIDUAL_TOL: dict[torch.dtype, float] = {torch.float64: 1e-12, torch.float32: 1e-5}


def reference_enforce(y: Tensor, bcs: Sequence[Any], **grid: Any) -> Tensor:
    """Dense float64 reference of the boundary output step (no lift).

    For each condition in order, the projection ``u - W C^T (C W C^T)^{-1} (C u - d)`` with the
    condition's rows ``C u = d`` (from :func:`~constraint_layers.functional.boundary_rows`) and
    ``W`` the 0/1 mask of the nodes it may move. Differentiable; builds ``C`` densely, so keep the
    grids small.

    Parameters
    ----------
    y : Tensor
        shape: (batch, channels, d1, ..., dn)
    bcs : sequence of BoundaryCondition
    **grid
        ``spacing``, ``extent``, ``endpoint``, ``inputs`` as for ``enforce_boundary``.

    Returns
    -------
    Tensor
        shape: like ``y``, float64.
    """
    u = y.to(torch.float64).reshape(y.shape[0], -1)
    size = u.shape[1]
    for rows in boundary_rows(y.shape, bcs, **grid):
        c = rows.dense(size).to(u.device)
        w = torch.zeros(size, dtype=torch.float64, device=u.device)
        w[rows.moves.flatten().to(u.device)] = 1.0
        cw = c * w
        a = cw @ c.T  # shape: (M, M)
        r = u @ c.T - rows.rhs.to(u.device)  # shape: (batch, M)
        u = u - torch.linalg.solve(a, r.T).T @ cw
    return u.reshape(y.shape)


def relative_residual(y: Tensor, bcs: Sequence[Any], **grid: Any) -> float:
    """Largest boundary residual relative to the size of the terms it balances.

    Neumann residuals are scaled by the spacing (``h * |du/dn - g|``), so every residual compares
    with ``max |u| + |value|``. Points that a later condition on another axis takes over (corners)
    are left out.
    """
    inputs = grid.pop("inputs", None)
    res = boundary_residuals(y.detach(), bcs, inputs=inputs, include_overridden=False, **grid)
    hs = resolve_spacing(y.shape[2:], **grid)
    worst = 0.0
    for bc, parts in zip(bcs, res):
        h = hs[bc.dim % (y.ndim - 2)] if bc.kind == "neumann" else 1.0
        value = bc.value if isinstance(bc.value, float) else 0.0
        scale = float(y.detach().abs().max()) + abs(value) * h + 1e-30
        for r in parts:
            worst = max(worst, float(r.abs().max()) * h / scale)
    return worst


class BoundaryLayerChecks:
    """Mixin of checks for a model wrapped with boundary conditions.

    Define ``make_model(dtype)``, ``make_input(batch, dtype)`` and ``conditions()``; optionally
    ``options()`` (keyword options of ``cl.wrap``, e.g. spacing) and ``dtypes``. The class name
    must start with ``Test`` for pytest to collect it. With ``lift > 0`` the comparisons with the
    dense reference (which is the projection without lift) are skipped.
    """

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    batch: int = 3
    seed: int = 0

    # ----------------------------------------------------------------------------- to define
    def make_model(self, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def make_input(self, batch: int, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def conditions(self) -> list[Any]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------------------ helpers
    def _setup(self, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, Any]:
        from ..adapters import wrap

        torch.manual_seed(self.seed)
        model = self.make_model(dtype)
        wrapped = wrap(model, *self.conditions(), **self.options())
        return model, wrapped, self.make_input(self.batch, dtype)

    def _grid(self, wrapped: nn.Module, x: Any) -> dict[str, Any]:
        return {
            "spacing": wrapped.spacing,
            "extent": wrapped.extent,
            "endpoint": wrapped.endpoint,
            "inputs": x,
        }

    # -------------------------------------------------------------------------------- checks
    def test_residual_is_rounding(self) -> None:
        for dtype in self.dtypes:
            _, wrapped, x = self._setup(dtype)
            y = wrapped.adapter.grid(wrapped(x))
            err = relative_residual(y, wrapped.bcs, **self._grid(wrapped, x))
            if err > RESIDUAL_TOL[dtype]:
                raise AssertionError(f"{dtype}: relative residual {err:.3e} after correction")

    def test_base_model_violates(self) -> None:
        model, wrapped, x = self._setup(torch.float64)
        y = wrapped.adapter.grid(model(x))
        err = relative_residual(y, wrapped.bcs, **self._grid(wrapped, x))
        if err < 1e-6:
            raise AssertionError(f"vacuous check: the base model already satisfies ({err:.2e})")

    def test_matches_dense_reference(self) -> None:
        for dtype in self.dtypes:
            _, wrapped, x = self._setup(dtype)
            if wrapped.lift:  # the dense reference is the projection without lift
                return
            got = wrapped.adapter.grid(wrapped(x)).detach()
            base = wrapped.adapter.grid(wrapped.base_output(x)).detach()
            ref = reference_enforce(base, wrapped.bcs, **self._grid(wrapped, x))
            scale = float(ref.abs().max()) + 1.0
            err = float((got.double() - ref).abs().max()) / scale
            tol = 50 * torch.finfo(dtype).eps
            if err > tol:
                raise AssertionError(f"{dtype}: differs from the dense reference by {err:.3e}")

    def test_idempotent(self) -> None:
        for dtype in self.dtypes:
            _, wrapped, x = self._setup(dtype)
            y = wrapped.adapter.grid(wrapped(x)).detach()
            z = wrapped.correct(y, x)
            err = float((z - y).abs().max()) / (float(y.abs().max()) + 1.0)
            if err > 50 * torch.finfo(dtype).eps:
                raise AssertionError(f"{dtype}: correcting twice moved the output by {err:.3e}")

    def test_gradients_match_reference(self) -> None:
        model, wrapped, x = self._setup(torch.float64)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or wrapped.lift:
            return
        out = wrapped.adapter.grid(wrapped(x))
        weight = torch.randn_like(out)
        got = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
        ref_out = reference_enforce(
            wrapped.adapter.grid(wrapped.base_output(x)), wrapped.bcs, **self._grid(wrapped, x)
        )
        want = torch.autograd.grad((ref_out * weight).sum(), params, allow_unused=True)
        for g, w in zip(got, want):
            if g is None and w is None:
                continue
            if not torch.allclose(g, w, rtol=1e-8, atol=1e-10):
                raise AssertionError("gradients differ from the dense reference")

    def test_batching(self) -> None:
        _, wrapped, x = self._setup(torch.float64)
        if not isinstance(x, Tensor):
            return
        whole = wrapped.adapter.grid(wrapped(x)).detach()
        for i in range(x.shape[0]):
            try:
                one = wrapped.adapter.grid(wrapped(x[i : i + 1])).detach()
            except GridError as exc:  # values given per sample of the full batch: not batchable
                if "does not broadcast" not in str(exc):
                    raise
                return
            if not torch.allclose(one[0], whole[i], rtol=1e-10, atol=1e-12):
                raise AssertionError(f"sample {i} differs when evaluated alone")

    def test_output_dtype(self) -> None:
        for dtype in self.dtypes:
            _, wrapped, x = self._setup(dtype)
            y = wrapped.adapter.grid(wrapped(x))
            if y.dtype != dtype:
                raise AssertionError(f"output dtype {y.dtype}, expected {dtype}")

    def test_state_dict_round_trip(self) -> None:
        model, wrapped, x = self._setup(torch.float64)
        sd = wrapped.state_dict()
        want = {"model." + k for k in model.state_dict() if k != "_metadata"}
        if set(sd) != want:
            raise AssertionError(f"state_dict keys {sorted(set(sd) ^ want)} out of place")
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        other = copy.deepcopy(wrapped)
        for p in other.parameters():
            p.data.add_(1.0)
        other.load_state_dict(loaded, strict=True)
        a = wrapped.adapter.grid(wrapped(x))
        b = other.adapter.grid(other(x))
        if not torch.equal(a, b):
            raise AssertionError("outputs differ after a state_dict round trip")

    def test_unwrap_identity(self) -> None:
        from ..adapters import unwrap

        model, wrapped, _ = self._setup(torch.float64)
        if wrapped.model is not model or unwrap(wrapped) is not model:
            raise AssertionError("the wrapper does not hold the very model that was wrapped")

    def test_no_mutation(self) -> None:
        model, wrapped, x = self._setup(torch.float64)
        if not isinstance(x, Tensor):
            return
        before = x.clone()
        base = wrapped.adapter.grid(model(x)).detach().clone()
        wrapped(x)
        if not torch.equal(x, before):
            raise AssertionError("the wrapper modified its input")
        again = wrapped.adapter.grid(model(x)).detach()
        if not torch.allclose(base, again, rtol=0, atol=0, equal_nan=True):
            raise AssertionError("the base model's output changed after wrapping")
