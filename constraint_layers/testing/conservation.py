"""A test mixin for conservation layers (re-exported by ``constraint_layers.testing``).

A concrete test class says how to build the model, the constraints and the input, and gives a
dense float64 reference of the constrained output; the mixin checks the rest: the residual, the
reference, idempotence, gradients, batching, dtypes, the state-dict round trip, unwrap identity,
that the caller's input is not modified, and non-vacuity (the base model violated the constraint).
Adapter authors get the same checks for free::

    class TestMyHead(ConservationLayerTests):
        def make_model(self, dtype):
            return MyHead().to(dtype)

        def make_constraints(self):
            return cl.Conservation.integral(0.0)

        def make_input(self, batch, dtype):
            return torch.randn(batch, 1, 33, dtype=dtype)

        def reference(self, model, x):
            mean, var = model(x)  # the raw output
            G, b = self.dense_rows(mean.shape, x)
            return self.dense_update(mean, G, b, variance=var)

Works with pytest (``Test*`` classes) and ``unittest.TestCase``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..layer import TOLERANCE
from ..conservation.constraint import Conservation, _constraints

__all__ = ["ConservationLayerTests", "dense_update"]

F64 = torch.float64


def dense_update(
    mean: Tensor,
    G: Tensor,
    b: Tensor,
    *,
    variance: Tensor | None = None,
    covariance: Tensor | None = None,
    noise: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """The conditioning formulas with explicit dense float64 matrices (a test reference).

    ``mean`` (B, N); ``G`` (M, N) or (B, M, N); ``b`` (B, M); ``variance`` (B, N) or
    ``covariance`` (B, N, N); none: the Euclidean projection. Returns the mean (B, N) and the
    dense posterior covariance (B, N, N) (None without uncertainty).
    """
    mu = mean.to(F64)
    G = G.to(F64).expand(mu.shape[0], *G.shape[-2:])
    b = b.to(F64)
    if covariance is not None:
        S = covariance.to(F64)
    elif variance is not None:
        S = torch.diag_embed(variance.to(F64))
    else:
        S = None
    W = torch.eye(mu.shape[-1], dtype=F64).expand(mu.shape[0], -1, -1) if S is None else S
    A = G @ W @ G.mT + noise**2 * torch.eye(G.shape[-2], dtype=F64)
    K = torch.linalg.solve(A, G @ W).mT  # W G^T A^{-1}
    new_mean = mu - (K @ (G @ mu.unsqueeze(-1) - b.unsqueeze(-1))).squeeze(-1)
    new_cov = None if S is None else S - K @ G @ S
    return new_mean, new_cov


class ConservationLayerTests:
    """Mixin: the checks every conservation wrapper must pass.

    Subclasses define :meth:`make_model`, :meth:`make_constraints`, :meth:`make_input` and
    :meth:`reference`; options go in ``layer_options``. Switch checks off with the class flags
    where a model cannot support them (e.g. ``batched = False`` for a GP whose event is the batch
    of test points, ``check_gradients = False`` for a stochastic model).
    """

    layer_options: ClassVar[dict[str, Any]] = {}
    #: The dtype of the main checks (float32 for models that compute in float32 only, e.g.
    #: neuraloperator's spectral convolutions).
    dtype: ClassVar[torch.dtype] = F64
    batched: ClassVar[bool] = True
    check_gradients: ClassVar[bool] = True
    check_float32: ClassVar[bool] = True
    #: Tolerance of the comparisons with the reference (default: by dtype).
    reference_tol: ClassVar[float | None] = None

    # ------------------------------------------------------------------ to be defined
    def make_model(self, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def make_constraints(self) -> Conservation | list[Conservation]:
        raise NotImplementedError

    def make_input(self, batch: int, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def reference(self, model: nn.Module, x: Any) -> tuple[Tensor, Tensor | None]:
        """Dense float64 reference: (mean, variance or None) in the output mean's layout."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ helpers
    def wrap(self, model: nn.Module) -> nn.Module:
        from ..conservation.constraint import ConservationProjection

        return ConservationProjection(model, self.make_constraints(), **self.layer_options)

    def build(self, dtype: torch.dtype | None = None, batch: int = 2, seed: int = 0):
        dtype = self.dtype if dtype is None else dtype
        torch.manual_seed(seed)
        model = self.make_model(dtype)
        x = self.make_input(batch, dtype)
        return model, self.wrap(model), x

    def gaussian(self, layer: nn.Module, output: Any):
        return layer.adapter.gaussian(output)

    def dense_rows(
        self, shape, x: Any = None, event_ndim: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """All constraints' rows for an output mean of ``shape``: ``(G, b)`` of shapes
        (M, N) or (batch, M, N), and (batch, M); ``event_ndim`` defaults to all axes but the
        first."""
        from ..conservation.constraint import _grid_view

        shape = tuple(shape)
        grid = _grid_view(
            torch.empty(shape, device="meta"),
            event_ndim if event_ndim is not None else max(len(shape) - 1, 1),
            self.layer_options.get("grid_shape"),
            "dense_rows",
        )
        n = math.prod(grid[1:])
        Gs, bs = [], []
        for c in _constraints(self.make_constraints(), "dense_rows"):
            r = c.rows(grid, inputs=x)
            Gs.append(r.dense(n))
            bs.append(r.rhs)
        if any(g.ndim == 3 for g in Gs):
            Gs = [g if g.ndim == 3 else g.expand(grid[0], *g.shape) for g in Gs]
        return torch.cat(Gs, -2), torch.cat(bs, -1)

    dense_update = staticmethod(dense_update)

    def tol(self, dtype: torch.dtype) -> float:
        return TOLERANCE.get(dtype, 1e-4)

    def ref_tol(self) -> float:
        return self.reference_tol if self.reference_tol is not None else self.tol(self.dtype)

    def scale(self, mean: Tensor) -> float:
        return float(mean.detach().abs().max()) + 1.0

    # --------------------------------------------------------------------------- checks
    def test_non_vacuous(self):
        model, layer, x = self.build()
        with torch.no_grad():
            out = model(x)
            res = layer.residual(out, x)
            scale = self.scale(self.gaussian(layer, out).mean)
        assert float(res.abs().max()) > 100 * self.tol(self.dtype) * scale, (
            "the unconstrained model already satisfies the constraint: the test proves nothing"
        )

    def test_residual(self):
        _model, layer, x = self.build()
        with torch.no_grad():
            out = layer(x)
            res = layer.residual(out, x)
            scale = self.scale(self.gaussian(layer, out).mean)
        worst = float(res.abs().max())
        assert worst < self.tol(self.dtype) * scale, f"residual {worst:.3e}"

    def test_matches_reference(self):
        model, layer, x = self.build()
        with torch.no_grad():
            g = self.gaussian(layer, layer(x))
            ref_mean, ref_var = self.reference(model, x)
        tol = self.ref_tol()
        torch.testing.assert_close(g.mean.to(F64), ref_mean.to(F64), rtol=tol, atol=tol)
        if ref_var is not None:
            var = g.variance
            if var is None and g.covariance is not None:
                var = torch.as_tensor(g.covariance.diagonal(dim1=-2, dim2=-1))
                if g.downdate is not None:
                    var = var - g.downdate.square().sum(-1)
            torch.testing.assert_close(var.to(F64), ref_var.to(F64), rtol=tol, atol=tol)

    def test_idempotent(self):
        model, layer, x = self.build()
        with torch.no_grad():
            g = layer.adapter.gaussian(layer.adapter.call(model, (x,), {}))
            once = layer.project(g, x)
            twice = layer.project(g._replace(mean=once.mean), x)
        tol = self.tol(self.dtype) * self.scale(once.mean)
        torch.testing.assert_close(twice.mean, once.mean, rtol=tol, atol=tol)

    def test_gradients(self):
        if not self.check_gradients:
            return
        _model, layer, x = self.build(dtype=F64, batch=1)
        if not isinstance(x, Tensor):
            return

        def f(inp):
            g = self.gaussian(layer, layer(inp))
            return g.mean if g.variance is None else (g.mean, g.variance)

        xr = x.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (xr,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)

    def test_batching(self):
        if not self.batched:
            return
        _model, layer, x = self.build(batch=3)
        with torch.no_grad():
            whole = self.gaussian(layer, layer(x)).mean
            parts = [self.gaussian(layer, layer(x[i : i + 1])).mean for i in range(3)]
        tol = self.tol(self.dtype) * self.scale(whole) * 1e-2
        torch.testing.assert_close(whole, torch.cat(parts), rtol=tol, atol=tol)

    def test_float32(self):
        if not self.check_float32:
            return
        _model, layer, x = self.build(dtype=torch.float32)
        with torch.no_grad():
            out = layer(x)
            g = self.gaussian(layer, out)
            res = layer.residual(out, x)
        assert g.mean.dtype == torch.float32, f"dtype {g.mean.dtype} came back for float32"
        assert float(res.abs().max()) < self.tol(torch.float32) * self.scale(g.mean)

    def test_state_dict_round_trip(self):
        model, layer, x = self.build()
        sd = layer.state_dict()
        own = [k for k, v in model.state_dict().items() if isinstance(v, Tensor)]
        assert set(sd) == {f"model.{k}" for k in own}, "state_dict keys are not model.<key>"
        torch.manual_seed(123)
        other = self.wrap(copy.deepcopy(model))
        for p in other.parameters():
            with torch.no_grad():
                p.add_(0.5)
        other.load_state_dict(sd, strict=True)
        with torch.no_grad():
            a = self.gaussian(layer, layer(x)).mean
            b = self.gaussian(other, other(x)).mean
        torch.testing.assert_close(a, b)

    def test_unwrap_identity(self):
        from ..adapters import unwrap

        model, layer, _ = self.build()
        assert layer.model is model
        assert unwrap(layer) is model

    def test_input_not_modified(self):
        _model, layer, x = self.build()
        if not isinstance(x, Tensor):
            return
        before = x.clone()
        with torch.no_grad():
            layer(x)
        assert torch.equal(x, before), "the wrapper modified its input"
