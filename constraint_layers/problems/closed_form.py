"""The base class of the closed-form problems (a parameter, a solution, a mass, data).

Subclasses (:mod:`constraint_layers.problems.gpme`) set the class constants and implement
``_solution(t, x, *params)`` and ``_mass(t, *params)`` on float64 tensors already broadcast
together; ``_param_tensors`` may add constants derived from the parameter (Stefan's ``alpha``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ._checks import (
    as_float64,
    check_choice,
    check_dtype,
    check_int,
    check_times,
    make_generator,
    out_dtype,
)
from .data import OperatorData, add_coordinates
from .neural_process import NeuralProcessData, sample_neural_process

__all__ = ["ClosedForm"]


class ClosedForm:
    """Base class of the closed-form problems: a parameter, a solution, a mass.

    Subclasses set the class constants and implement ``_solution(p, t, x)`` and ``_mass(p, t)``
    on float64 tensors that are already broadcast together.
    """

    name: ClassVar[str]
    param_name: ClassVar[str]
    domain: ClassVar[tuple[float, float]]
    t_range: ClassVar[tuple[float, float]]
    t_star: ClassVar[float]
    TRAIN_RANGE: ClassVar[tuple[float, float]]
    TEST_PARAMS: ClassVar[tuple[float, ...]]

    def __init__(self, param: float | Tensor) -> None:
        call = type(self).__name__
        p = as_float64(param, self.param_name, call)
        self._check_param(p, call)
        self.param = p

    def _check_param(self, p: Tensor, call: str) -> None:  # pragma: no cover - overridden
        pass

    def __repr__(self) -> str:
        p = self.param
        shown = f"{float(p):g}" if p.ndim == 0 else f"tensor of shape {tuple(p.shape)}"
        return f"{type(self).__name__}({self.param_name}={shown})"

    # ------------------------------------------------------------------------- evaluation
    def _param_tensors(self) -> tuple[Tensor, ...]:
        """The parameter and any constants derived from it (all of the parameter's shape)."""
        return (self.param,)

    def _prepare(
        self, *values: Tensor | float, names: tuple[str, ...], call: str
    ) -> tuple[list[Tensor], list[Tensor]]:
        tensors = [as_float64(v, n, call) for v, n in zip(values, names)]
        ps = self._param_tensors()
        try:
            out = list(torch.broadcast_tensors(*ps, *tensors))
        except RuntimeError as exc:
            shapes = [tuple(self.param.shape), *[tuple(t.shape) for t in tensors]]
            raise ValueError(
                f"{call}: the parameter and {', '.join(names)} must broadcast together, got "
                f"shapes {shapes}. For a batch of parameters on a grid use on_grid(t, x)."
            ) from exc
        return out[len(ps) :], out[: len(ps)]

    def solution(self, t: Tensor | float, x: Tensor | float) -> Tensor:
        """The exact solution ``u(t, x)``.

        Parameters
        ----------
        t, x : Tensor or float
            Broadcast together with the parameter.

        Returns
        -------
        Tensor
            shape: broadcast of (parameter, t, x); the floating dtype of ``t`` / ``x``.
        """
        (tt, xx), ps = self._prepare(t, x, names=("t", "x"), call=f"{type(self).__name__}.solution")
        return self._solution(tt, xx, *ps).to(out_dtype(t, x))

    def mass(self, t: Tensor | float) -> Tensor:
        """The analytic total ``integral of u(t, x) dx`` over ``domain``.

        Returns
        -------
        Tensor
            shape: broadcast of (parameter, t).
        """
        (tt,), ps = self._prepare(t, names=("t",), call=f"{type(self).__name__}.mass")
        return self._mass(tt, *ps).to(out_dtype(t))

    def _front_values(self, t: Tensor | float) -> Tensor:
        (tt,), ps = self._prepare(t, names=("t",), call=f"{type(self).__name__}.front")
        return self._front(tt, *ps).to(out_dtype(t))

    def on_grid(self, t: Tensor, x: Tensor) -> Tensor:
        """The solution of every parameter on the tensor grid ``t x x``.

        Parameters
        ----------
        t : Tensor
            shape: (T,)
        x : Tensor
            shape: (X,)

        Returns
        -------
        Tensor
            shape: (*parameter shape, T, X).
        """
        call = f"{type(self).__name__}.on_grid"
        tt = as_float64(t, "t", call).reshape(-1, 1)
        xx = as_float64(x, "x", call).reshape(1, -1)
        ps = [p.reshape(*p.shape, 1, 1) for p in self._param_tensors()]
        out = torch.broadcast_tensors(*ps, tt, xx)
        return self._solution(out[-2], out[-1], *out[:-2]).to(out_dtype(t, x))

    def _solution(self, t: Tensor, x: Tensor, p: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _mass(self, t: Tensor, p: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _front(self, t: Tensor, p: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    # --------------------------------------------------------------------- parameters
    @classmethod
    def train_params(cls, n: int, seed: int | torch.Generator = 0) -> Tensor:
        """``n`` parameters drawn uniformly from ``TRAIN_RANGE`` (float64, shape ``(n,)``)."""
        call = f"{cls.__name__}.train_params"
        n = check_int(n, "n", call)
        gen = make_generator(seed, call)
        lo, hi = cls.TRAIN_RANGE
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    @classmethod
    def test_params(cls, n_per_value: int = 50) -> Tensor:
        """Each value of ``TEST_PARAMS`` repeated ``n_per_value`` times (shape ``(n,)``)."""
        n_per_value = check_int(n_per_value, "n_per_value", f"{cls.__name__}.test_params")
        values = torch.tensor(cls.TEST_PARAMS, dtype=torch.float64)
        return values.repeat_interleave(n_per_value)

    # --------------------------------------------------------------------------- data
    def _batch_params(self, call: str) -> Tensor:
        if self.param.ndim != 1:
            raise ValueError(
                f"{call}: expected a 1-D batch of parameters (one per function), got shape "
                f"{tuple(self.param.shape)}. Build the problem with e.g. "
                f"{type(self).__name__}({type(self).__name__}.train_params(n))."
            )
        return self.param

    def neural_process_data(
        self,
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
        """Context, target and dense-grid data of every function (one per parameter).

        See :func:`constraint_layers.problems.sample_neural_process` for the sampling scheme.

        Examples
        --------
        >>> from constraint_layers.problems import Stefan
        >>> data = Stefan(Stefan.test_params(2)).neural_process_data(seed=0)
        >>> data.context_x.shape, data.target_y.shape, data.grid_u.shape
        (torch.Size([4, 100, 2]), torch.Size([4, 100, 1]), torch.Size([4, 201, 201]))
        """
        params = self._batch_params(f"{type(self).__name__}.neural_process_data")
        return sample_neural_process(
            self,
            params,
            seed=seed,
            n_context_t=n_context_t,
            n_context_x=n_context_x,
            n_target_t=n_target_t,
            n_target_x=n_target_x,
            dense=dense,
            n_grid_t=n_grid_t,
            n_grid_x=n_grid_x,
            dtype=dtype,
        )

    def operator_data(
        self,
        *,
        task: str = "frames",
        resolution: int = 201,
        times: Tensor | None = None,
        n_frames: int = 25,
        coords: bool = False,
        dtype: torch.dtype | None = None,
    ) -> OperatorData:
        """Operator-style pairs: the parameter as a constant input channel -> the solution.

        The initial conditions of this family carry no information (zero for PME and Stefan), so
        the input function is the parameter broadcast over the grid.

        Parameters
        ----------
        task : "frames" or "single"
            "frames": ``n_frames`` times evenly spaced in ``(t0, t1]`` of ``t_range`` (or
            ``times``), grid ``(resolution, T)``; "single": the table time ``t_star``.
        resolution : int
            Number of x nodes, both ends of ``domain`` included.

        Returns
        -------
        OperatorData
            ``x``: (n, 1 [+ 2], N, T) or (n, 1 [+ 1], N); ``y``: (n, 1, N, T) or (n, 1, N).

        Examples
        --------
        >>> from constraint_layers.problems import PorousMedium
        >>> data = PorousMedium(PorousMedium.test_params(1)).operator_data(resolution=11)
        >>> data.x.shape, data.y.shape
        (torch.Size([3, 1, 11, 25]), torch.Size([3, 1, 11, 25]))
        """
        call = f"{type(self).__name__}.operator_data"
        params = self._batch_params(call)
        task = check_choice(task, ("frames", "single"), "task", call)
        resolution = check_int(resolution, "resolution", call, minimum=2)
        dtype = check_dtype(dtype, call)
        t0, t1 = self.t_range
        if task == "single":
            t = torch.tensor([self.t_star], dtype=torch.float64)
        elif times is not None:
            t = check_times(times, call, allow_zero=True)
        else:
            n_frames = check_int(n_frames, "n_frames", call)
            t = torch.linspace(t0, t1, n_frames + 1, dtype=torch.float64)[1:]
        x = torch.linspace(*self.domain, resolution, dtype=torch.float64)
        u = self.on_grid(t, x).to(torch.float64)  # (n, T, X)
        y = u.transpose(1, 2).unsqueeze(1)  # (n, 1, X, T)
        inp = params.reshape(-1, 1, 1, 1).expand(-1, 1, resolution, t.numel())
        grid = {"x": x, "t": t}
        if task == "single":
            y, inp = y[..., 0], inp[..., 0]
            grid = {"x": x}
        meta = {
            "problem": self.name,
            "task": task,
            "param_name": self.param_name,
            "domain": self.domain,
            "layout": "(n, C, x, t)" if task == "frames" else "(n, C, x)",
            "coordinate_channels": bool(coords),
        }
        grid = {k: v.to(dtype) for k, v in grid.items()}
        inp, y = inp.to(dtype), y.to(dtype)
        if coords:
            inp = add_coordinates(inp, grid)
        return OperatorData(
            x=inp,
            y=y,
            coords=grid,
            params={self.param_name: params.to(dtype)},
            meta=meta,
        )
