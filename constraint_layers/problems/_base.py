"""The shared ``generate`` of the numerical reference problems (private).

A reference problem (:class:`~constraint_layers.problems.Heat`, ``Stokes``, ``Burgers``,
``Cavity``) implements ``_generate`` (sample the inputs with the generator, solve, return float64
tensors) and states its physical constants (``config``), its size presets and its solver settings.
This module turns that into :meth:`ReferenceProblem.generate`: argument checks, the cache, the
channel-first layout and the coordinate channels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from numbers import Integral
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._checks import check_choice, check_dtype, check_int, check_times, make_generator
from .cache import cached
from .data import OperatorData, add_coordinates

__all__ = ["ReferenceProblem", "chunks"]

SIZES = ("small", "paper")
TASKS = ("frames", "single")


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` samples covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class ReferenceProblem:
    """Base class of the numerical reference problems (see the module docstring)."""

    name: ClassVar[str]
    #: bumped whenever the generated values change for the same parameters (part of the cache key)
    version: ClassVar[int] = 1
    #: names of the spatial axes, in order
    space_axes: ClassVar[tuple[str, ...]] = ("x",)
    #: smallest accepted resolution
    min_resolution: ClassVar[int] = 5
    t_final: float

    # ------------------------------------------------------------------ to implement
    @property
    def bc(self) -> str:
        """The kind of boundary condition the data holds: "dirichlet", "neumann" or "periodic"."""
        raise NotImplementedError  # pragma: no cover

    def config(self) -> dict[str, Any]:
        """The physical constants (JSON-able); part of the cache key."""
        raise NotImplementedError  # pragma: no cover

    def sizes(self, task: str) -> dict[str, dict[str, int]]:
        """``{"small": {"n": ..., "resolution": ...}, "paper": {...}}`` for ``task``."""
        raise NotImplementedError  # pragma: no cover

    def solver_settings(self, resolution: int, times: Tensor) -> dict[str, Any]:
        """Discretisation choices that change the values (JSON-able); part of the cache key."""
        raise NotImplementedError  # pragma: no cover

    def _generate(
        self, n: int, resolution: int, times: Tensor, gen: torch.Generator, progress: bool
    ) -> dict[str, Tensor]:
        """Float64 tensors: ``u0`` (n, *space), ``u`` (n, *space, T), ``coord_<axis>`` (N,),
        ``param_<name>`` (n, ...) and ``bc_<axis>_<side>`` (n, *face, T)."""
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------------ shared
    def default_times(self, task: str) -> Tensor:
        """25 frames evenly spaced in ``(0, t_final]``, or ``(t_final,)`` for a single step."""
        if task == "single":
            return torch.tensor([self.t_final], dtype=torch.float64)
        return torch.linspace(0.0, self.t_final, 26, dtype=torch.float64)[1:]

    def spec(
        self,
        n: int,
        resolution: int,
        times: Tensor,
        seed: int,
        dtype: torch.dtype,
    ) -> dict[str, Any]:
        """Every parameter that determines the generated tensors (the cache key)."""
        return {
            "problem": self.name,
            "generator_version": self.version,
            "config": self.config(),
            "n": n,
            "resolution": resolution,
            "times": [float(t) for t in times],
            "seed": seed,
            "dtype": str(dtype),
            "solver": self.solver_settings(resolution, times),
        }

    def generate(
        self,
        n: int | None = None,
        *,
        task: str = "frames",
        size: str = "small",
        resolution: int | None = None,
        times: Tensor | None = None,
        seed: int = 0,
        coords: bool = False,
        dtype: torch.dtype | None = None,
        cache: bool | str = True,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = False,
        threads: int | None = None,
    ) -> OperatorData:
        """Generate (or load from the cache) ``n`` input/solution pairs.

        Parameters
        ----------
        n : int, optional
            Number of samples; default from ``size``. Split train/test with
            :meth:`OperatorData.split`.
        task : "frames" or "single"
            "frames": the solution at several times, time the last grid axis (25 frames evenly
            spaced in ``(0, t_final]`` unless ``times`` is given); "single": at ``t_final`` only.
        size : "small" or "paper"
            Preset of ``n`` and ``resolution``: "small" generates in seconds, "paper" matches the
            paper's data set; explicit ``n`` / ``resolution`` override the preset.
        resolution : int, optional
            Grid nodes per spatial axis, both ends included.
        times : Tensor, optional
            shape: (T,). Increasing positive output times (``task="frames"``).
        seed : int
            Seeds every random draw: the same arguments give the same tensors bit for bit.
        coords : bool
            Append coordinate channels (see :func:`add_coordinates`); not part of the cache key.
        dtype : torch.dtype, optional
            Of the returned tensors (default: the default dtype). Solvers run in float64.
        cache : bool or "refresh"
            Read / write the on-disk cache (see :mod:`constraint_layers.problems.cache`).
        cache_dir : path, optional
            Default: ``$CONSTRAINT_LAYERS_CACHE``, else ``~/.cache/constraint-layers``.
        progress : bool
            Show a tqdm progress bar if tqdm is installed.
        threads : int, optional
            Run the solver on this many intra-op threads (``torch.set_num_threads``), restoring
            the previous setting afterwards; default: leave torch's setting alone. The solvers
            work on many small tensors: on a busy machine ``threads=1`` can be much faster
            (measured 25x on a shared 2-core machine). The values do not depend on it.

        Returns
        -------
        OperatorData
        """
        call = f"{type(self).__name__}.generate"
        task = check_choice(task, TASKS, "task", call)
        size = check_choice(size, SIZES, "size", call)
        preset = self.sizes(task)[size]
        n = preset["n"] if n is None else check_int(n, "n", call)
        if resolution is None:
            resolution = preset["resolution"]
        resolution = check_int(resolution, "resolution", call, minimum=self.min_resolution)
        if times is None:
            t = self.default_times(task)
        else:
            t = check_times(times, call)
            if task == "single" and t.numel() != 1:
                raise ValueError(
                    f"{call}: task='single' takes one time, got {t.numel()}; use task='frames'."
                )
        if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
            raise TypeError(
                f"{call}: seed must be a non-negative int (it is part of the cache key), got "
                f"{seed!r}."
            )
        seed = int(seed)
        dtype = check_dtype(dtype, call)
        if not isinstance(coords, bool) or not isinstance(progress, bool):
            raise TypeError(f"{call}: coords and progress must be bools.")
        if threads is not None:
            threads = check_int(threads, "threads", call)
        spec = self.spec(n, resolution, t, seed, dtype)

        def make() -> dict[str, Tensor]:
            gen = make_generator(seed, call)
            start = time.perf_counter()
            before = torch.get_num_threads()
            try:
                if threads is not None:
                    torch.set_num_threads(threads)
                out = self._generate(n, resolution, t, gen, progress)
            finally:
                torch.set_num_threads(before)
            tensors = {k: v.to(dtype) for k, v in out.items()}
            tensors["seconds"] = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            return tensors

        tensors = cached(self.name, spec, make, cache=cache, cache_dir=cache_dir)
        return self._assemble(tensors, task, size, spec, coords)

    def _assemble(
        self,
        tensors: dict[str, Tensor],
        task: str,
        size: str,
        spec: dict[str, Any],
        coords: bool,
    ) -> OperatorData:
        u0, u = tensors["u0"], tensors["u"]
        n_t = u.shape[-1]
        grid = {a: tensors[f"coord_{a}"] for a in self.space_axes}
        times = torch.tensor(spec["times"], dtype=u.dtype)
        params = {k[len("param_") :]: v for k, v in tensors.items() if k.startswith("param_")}
        boundary = {
            k[len("bc_") :]: v.unsqueeze(1) for k, v in tensors.items() if k.startswith("bc_")
        }
        if task == "single":
            y = u[..., 0].unsqueeze(1)
            x = u0.unsqueeze(1)
            boundary = {k: v[..., 0] for k, v in boundary.items()}
            layout = f"(n, C, {', '.join(self.space_axes)})"
        else:
            grid["t"] = times
            y = u.unsqueeze(1)
            x = u0.unsqueeze(1).unsqueeze(-1).expand(*u0.shape[:1], 1, *u0.shape[1:], n_t)
            layout = f"(n, C, {', '.join(self.space_axes)}, t)"
        if coords:
            x = add_coordinates(x, grid)
        meta = {
            "problem": self.name,
            "task": task,
            "size": size,
            "bc": self.bc,
            "layout": layout,
            "coordinate_channels": coords,
            "generation_seconds": float(tensors["seconds"]),
            "spec": spec,
        }
        return OperatorData(x=x, y=y, coords=grid, params=params, boundary=boundary, meta=meta)
