"""The test mixin every constraint layer passes (the builder pattern of linear_operator's tests).

A concrete test class says how to build the model, its input and the constraints; the mixin
derives the dense float64 reference from the constraints' rows (any family, any mix) and checks
the rest::

    class TestMyHead(ConstraintLayerTests):
        def make_model(self, dtype):
            return MyHead().to(dtype)

        def make_input(self, batch, dtype):
            return torch.randn(batch, 1, 33, dtype=dtype)

        def make_constraints(self):
            return [cl.Dirichlet(0.0), cl.Conservation.integral(1.0)]

Checks: every row holds to the tolerance table's residual (float64 and float32), every value lies
within the bounds (``cl.Bounds``, exactly), the base model violated the rows (non-vacuity),
agreement with the dense reference (values and gradients; with bounds, the dense QP; local rows
such as ``cl.DivergenceFree`` as a dense matrix built from their operator's Kronecker factors),
idempotence, batching, the output dtype, the ``state_dict`` round trip, ``unwrap`` identity, and
that neither the input nor the base model changes. Works with pytest (``Test*`` classes) and
``unittest.TestCase``.
"""

from __future__ import annotations

import copy
import io
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._tolerance import tolerance
from ..conservation.enforce import grid_view
from ..conservation.gaussian import Gaussian
from ..errors import GridError
from .reference import reference_prediction, rows_of

__all__ = ["ConstraintLayerTests"]

F64 = torch.float64


class ConstraintLayerTests:
    """Mixin: the checks every constraint wrapper must pass.

    Define :meth:`make_model`, :meth:`make_input` and :meth:`make_constraints`; options of
    ``cl.wrap`` go in ``layer_options`` (or :meth:`options`). Switch checks off with the class
    flags where a model cannot support them (``batched = False`` for a GP whose event is the batch
    of test points, ``check_gradients = False`` for a stochastic model).
    """

    layer_options: ClassVar[dict[str, Any]] = {}
    #: The dtypes of the exactness checks (float32 models: neuraloperator's spectral convolutions
    #: compute in complex64 whatever the input dtype).
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float64)
    #: The dtype of the reference and gradient checks.
    dtype: ClassVar[torch.dtype] = F64
    batch: ClassVar[int] = 3
    seed: ClassVar[int] = 0
    batched: ClassVar[bool] = True
    #: A model whose output changes from call to call (MC dropout): no equality of repeated calls.
    stochastic: ClassVar[bool] = False
    check_gradients: ClassVar[bool] = True
    #: Tolerance of the comparisons with the reference (default: the table's, by dtype).
    reference_tol: ClassVar[float | None] = None

    # ------------------------------------------------------------------ to be defined
    def make_model(self, dtype: torch.dtype) -> nn.Module:
        """The model to wrap, in ``dtype`` (define it in your test class)."""
        raise NotImplementedError

    def make_input(self, batch: int, dtype: torch.dtype) -> Any:
        """The model's input for ``batch`` samples in ``dtype`` (define it in your test class)."""
        raise NotImplementedError

    def make_constraints(self) -> Any:
        """The constraint, or a list of them, to wrap the model with (define it)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Keyword options of ``cl.wrap`` (default: ``layer_options``)."""
        return dict(self.layer_options)

    # ------------------------------------------------------------------------ helpers
    def wrap(self, model: nn.Module) -> nn.Module:
        from ..adapters import wrap

        cons = self.make_constraints()
        cons = list(cons) if isinstance(cons, (list, tuple)) else [cons]
        return wrap(model, *cons, **self.options())

    def build(
        self, dtype: torch.dtype | None = None, batch: int | None = None, seed: int | None = None
    ):
        """``(model, wrapper, input)`` for one dtype."""
        dtype = self.dtype if dtype is None else dtype
        torch.manual_seed(self.seed if seed is None else seed)
        model = self.make_model(dtype)
        x = self.make_input(self.batch if batch is None else batch, dtype)
        return model, self.wrap(model), x

    def prediction(self, layer: nn.Module, output: Any) -> Gaussian:
        """The prediction record inside an output (the adapter's reading)."""
        return layer.adapter.read(output)

    def reference(self, model: nn.Module, x: Any) -> tuple[Tensor, Tensor | None]:
        """Dense float64 reference: (mean, variance or None) in the output mean's layout.

        Default: derived from the constraints' rows (:func:`reference_prediction`) applied to the
        wrapped model's own output before the projection.
        """
        layer = self._layer_for_reference
        pred = self.prediction(layer, layer.base_output(x))
        return reference_prediction(
            pred,
            layer.constraints,
            grid=layer.grid,
            lift=layer.lift,
            noise=layer.noise,
            metric=layer.metric,
            grid_shape=layer.grid_shape,
            inputs=x,
        )

    def _reference(self, layer: nn.Module, x: Any) -> tuple[Tensor, Tensor | None]:
        self._layer_for_reference = layer
        try:
            return self.reference(layer.model, x)
        finally:
            del self._layer_for_reference

    def worst_residual(self, layer: nn.Module, output: Any, x: Any) -> float:
        """The largest relative residual of every row on an output (physical units)."""
        from ..layer import _to_physical, current_normalizer

        g = self.prediction(layer, output)
        norm = current_normalizer(layer.normalizer)
        if norm is not None:
            g, _ = _to_physical(g, norm)
        shape = grid_view(g.mean, g.event_ndim, layer.grid_shape, "worst_residual")
        u = g.mean.detach().reshape(shape[0], -1)
        # local rows (one per node) are judged as the library states them: relative to the
        # terms each row balances (LocalRows.relative_residual); the others as Rows
        local = [c for c in layer.constraints if c.family == "local"]
        other = [c for c in layer.constraints if c.family != "local"]
        brows, crows = rows_of(other, shape, grid=layer.grid, inputs=x)
        worst = 0.0
        for r in [*brows, *crows]:
            if r.num_rows:
                worst = max(worst, float(r.relative_residual(u).max()))
        for c in local:
            rows = c.rows(shape, grid=layer.grid, inputs=x)
            worst = max(worst, float(rows.relative_residual(u.reshape(shape)).max()))
        return worst

    def ref_tol(self, dtype: torch.dtype | None = None) -> float:
        if self.reference_tol is not None:
            return self.reference_tol
        return tolerance(self.dtype if dtype is None else dtype).reference

    @staticmethod
    def scale(mean: Tensor) -> float:
        return float(mean.detach().abs().max()) + 1.0

    # --------------------------------------------------------------------------- checks
    def test_non_vacuous(self) -> None:
        _model, layer, x = self.build()
        with torch.no_grad():
            worst = self.worst_residual(layer, layer.base_output(x), x)
        if not worst > 100 * tolerance(self.dtype).residual:
            raise AssertionError(
                f"vacuous check: the base model already satisfies the constraints ({worst:.2e})"
            )

    def test_residual(self) -> None:
        for dtype in self.dtypes:
            _model, layer, x = self.build(dtype)
            with torch.no_grad():
                worst = self.worst_residual(layer, layer(x), x)
            if not worst <= tolerance(dtype).residual:
                raise AssertionError(f"{dtype}: relative residual {worst:.3e} after the projection")

    def test_bounds_hold(self) -> None:
        """Every value within the bounds (``cl.Bounds``), exactly, in every dtype."""
        from ..bounds import resolve_bounds
        from ..layer import _to_physical, current_normalizer

        bounds = [c for c in self.wrap(self.make_model(self.dtype)).constraints
                  if c.family == "bounds"]  # fmt: skip
        if not bounds:
            return
        for dtype in self.dtypes:
            _model, layer, x = self.build(dtype)
            with torch.no_grad():
                g = self.prediction(layer, layer(x))
            norm = current_normalizer(layer.normalizer)
            if norm is not None:
                g, _ = _to_physical(g, norm)
            shape = grid_view(g.mean, g.event_ndim, layer.grid_shape, "test_bounds_hold")
            y = g.mean.detach().reshape(shape)
            lo, hi = resolve_bounds(
                bounds, shape, dtype=y.dtype, device=y.device, inputs=x,
                flat_shape=tuple(g.mean.shape), call="test_bounds_hold",
            )  # fmt: skip
            if lo is not None and not bool((y >= lo).all()):
                raise AssertionError(f"{dtype}: {float((lo - y).max()):.3e} below a lower bound")
            if hi is not None and not bool((y <= hi).all()):
                raise AssertionError(f"{dtype}: {float((y - hi).max()):.3e} above an upper bound")

    def test_matches_reference(self) -> None:
        _model, layer, x = self.build()
        with torch.no_grad():
            g = self.prediction(layer, layer(x))
            ref_mean, ref_var = self._reference(layer, x)
        from ..layer import _to_physical, current_normalizer

        norm = current_normalizer(layer.normalizer)
        if norm is not None:  # the reference is in physical units
            g, _ = _to_physical(g, norm)
        tol = self.ref_tol()
        scale = self.scale(ref_mean)
        torch.testing.assert_close(g.mean.to(F64), ref_mean.to(F64), rtol=tol, atol=tol * scale)
        if ref_var is not None:
            var = g.variance
            if var is None and g.covariance is not None:
                var = torch.as_tensor(g.covariance.diagonal(dim1=-2, dim2=-1))
                if g.downdate is not None:
                    var = var - g.downdate.square().sum(-1)
            vs = self.scale(ref_var)
            torch.testing.assert_close(var.to(F64), ref_var.to(F64), rtol=tol, atol=tol * vs)

    def test_idempotent(self) -> None:
        _model, layer, x = self.build()
        with torch.no_grad():
            g = self.prediction(layer, layer.base_output(x))
            once = layer.project(g, x)
            again = g._replace(mean=once.mean)  # the projected mean with the model's uncertainty
            twice = layer.project(again, x)
        tol = self.ref_tol() * self.scale(once.mean)
        torch.testing.assert_close(twice.mean, once.mean, rtol=tol, atol=tol)

    def test_gradients(self) -> None:
        """Gradients into the model's parameters equal the dense reference's."""
        if not self.check_gradients:
            return
        model, layer, x = self.build(dtype=F64, batch=2)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        g = self.prediction(layer, layer(x))
        weight = torch.randn_like(g.mean)
        got = torch.autograd.grad((g.mean * weight).sum(), params, allow_unused=True)
        ref_mean, _ = self._reference(layer, x)
        from ..layer import current_normalizer

        norm = current_normalizer(layer.normalizer)
        if norm is not None:
            ref_mean = norm.transform(ref_mean.to(g.mean.dtype))
        want = torch.autograd.grad((ref_mean * weight).sum(), params, allow_unused=True)
        for a, b in zip(got, want):
            if a is None and b is None:
                continue
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            if not torch.allclose(a, b, rtol=1e-7, atol=1e-9 * (float(b.abs().max()) + 1.0)):
                raise AssertionError(
                    f"gradients differ from the dense reference by {float((a - b).abs().max()):.3e}"
                )

    def test_batching(self) -> None:
        if not self.batched:
            return
        _model, layer, x = self.build(batch=3)
        if not isinstance(x, Tensor):
            return
        with torch.no_grad():
            whole = self.prediction(layer, layer(x)).mean
            parts = []
            for i in range(3):
                try:
                    parts.append(self.prediction(layer, layer(x[i : i + 1])).mean)
                except (GridError, ValueError) as exc:  # values given per sample of the batch
                    if "broadcast" not in str(exc):
                        raise
                    return
        tol = self.ref_tol() * self.scale(whole)
        torch.testing.assert_close(whole, torch.cat(parts), rtol=tol, atol=tol)

    def test_output_dtype(self) -> None:
        for dtype in self.dtypes:
            _model, layer, x = self.build(dtype)
            with torch.no_grad():
                got = self.prediction(layer, layer(x)).mean.dtype
                base = self.prediction(layer, layer.base_output(x)).mean.dtype
            if got != base:
                raise AssertionError(f"output dtype {got}, the model gave {base}")

    def test_state_dict_round_trip(self) -> None:
        model, layer, x = self.build()
        sd = layer.state_dict()
        own = {k for k, v in model.state_dict().items() if isinstance(v, Tensor)}
        if set(sd) != {f"model.{k}" for k in own}:
            raise AssertionError(f"state_dict keys are not model.<key>: {sorted(sd)[:5]}")
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        other = self.wrap(copy.deepcopy(model))
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.5)
        other.load_state_dict(loaded, strict=True)
        with torch.no_grad():
            a = self.prediction(layer, layer(x)).mean
            b = self.prediction(other, other(x)).mean
        if not torch.equal(a, b):
            raise AssertionError("outputs differ after a state_dict round trip")

    def test_unwrap_identity(self) -> None:
        from ..adapters import unwrap

        model, layer, _ = self.build()
        if layer.model is not model or unwrap(layer) is not model:
            raise AssertionError("the wrapper does not hold the very model that was wrapped")

    def test_input_not_modified(self) -> None:
        _model, layer, x = self.build()
        if not isinstance(x, Tensor):
            return
        before = x.clone()
        with torch.no_grad():
            base = self.prediction(layer, layer.base_output(x)).mean.clone()
            layer(x)
            again = self.prediction(layer, layer.base_output(x)).mean
        if not torch.equal(x, before):
            raise AssertionError("the wrapper modified its input")
        if not self.stochastic and not torch.allclose(base, again, rtol=0, atol=0, equal_nan=True):
            raise AssertionError("the base model's output changed after a call of the wrapper")
