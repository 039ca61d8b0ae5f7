"""neuraloperator's point-cloud models: GINO and FNOGNO (imported only when one is wrapped).

Both predict at scattered query points, channel-last: GINO returns ``(batch, n_points, channels)``
and FNOGNO ``(n_points, channels)`` (unbatched). The wrapper reads these as point clouds (the
layer's ``layout="points"``): constraints are stated on points (``cl.Dirichlet(points=)``,
``cl.NormalComponent``, ``cl.Conservation.integral(weights=)``, ``cl.Bounds``); a constraint on a
grid's faces, a grid integral and ``mode="refine"`` are refused with what to use instead.

The models are called with the query points as arguments; values given as callables receive the
call's arguments as a dict: its keyword arguments by name, and its positional ones as a tuple
under ``"args"`` (e.g. ``lambda call: normals_at(call["output_queries"])``). Checkpoints work as
for every neuraloperator model (``save_checkpoint`` / ``from_checkpoint``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from constraint_layers.functional import Gaussian

from ._registry import register
from .neuralop import NeuralopAdapter

__all__ = ["NeuralopPointAdapter"]


@register("neuralop.models.gino.GINO", "neuralop.models.fnogno.FNOGNO")
class NeuralopPointAdapter(NeuralopAdapter):
    """GINO and FNOGNO: outputs are point clouds ``(batch, n_points, channels)`` or
    ``(n_points, channels)``."""

    name = "neuraloperator-points"
    supports_refinement = False

    def layout(self, model: nn.Module) -> str:
        return "points"

    def model_input(self, args: tuple, kwargs: dict) -> Any:
        """The call's arguments as a dict: keywords by name, positionals under ``"args"``."""
        return {**kwargs, "args": tuple(args)}

    def read(self, output: Any) -> Gaussian:
        if isinstance(output, dict):
            raise TypeError(
                f"{self!r}: the model returned a dict of outputs (output_queries given as a dict); "
                "constraints act on one point cloud at a time: call the wrapper with one tensor "
                "of output_queries per call."
            )
        if not isinstance(output, Tensor) or output.ndim not in (2, 3):
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise TypeError(
                f"{self!r}: expected a point cloud (batch, n_points, channels) or "
                f"(n_points, channels), got {got}."
            )
        return Gaussian(output, event_ndim=2)

    def write(self, output: Any, prediction: Gaussian) -> Any:
        return prediction.mean
