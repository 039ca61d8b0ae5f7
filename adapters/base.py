"""The adapter interface: how a constraint layer talks to one family of models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from constraint_layers.functional import Gaussian

__all__ = ["Adapter"]


class Adapter:
    """How constraint layers call a model and find the quantity to constrain in its output.

    Subclass it for a model family and register it with
    :func:`constraint_layers.adapters.register`. One protocol serves every constraint family:
    :meth:`read` finds the prediction in the model's output (a grid tensor or a Gaussian, as one
    record), :meth:`write` puts the constrained one back. Every method has a default that suits an
    ``nn.Module`` called as ``model(x, ...)`` and returning a tensor; override only what differs.
    Adapters hold no per-model state (one instance serves every model of the type); per-wrapper
    state belongs on the wrapper, set up in :meth:`attach`.

    Attributes
    ----------
    name : str
        Unique name, shown in error messages (default: the class name).
    targets : tuple of type or str
        Model types served, used when the adapter is registered through an entry point.
    supports_refinement : bool
        Whether ``mode="refine"`` (BOON's kernel refinement) can refine the model's layers: the
        adapter's :meth:`attach` then calls ``wrapper.add_refinement`` on them.
    """

    name: ClassVar[str] = ""
    targets: ClassVar[tuple[type | str, ...]] = ()
    supports_refinement: ClassVar[bool] = False

    # ------------------------------------------------------------------------------ calling
    def call(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Run the model (the library's own calling convention)."""
        return model(*args, **kwargs)

    def model_input(self, args: tuple, kwargs: dict) -> Any:
        """The model input handed to callable constraint values: the first positional argument,
        else the keyword ``x``, else None."""
        if args:
            return args[0]
        return kwargs.get("x")

    def layout(self, model: nn.Module) -> str:
        """How the model's output is laid out: ``"grid"`` (channel-first,
        ``(batch, channels, d1, ..., dn)``) or ``"points"`` (a point cloud, channel-last:
        ``(batch, n_points, channels)``). Read when the wrapper is built with ``layout="auto"``.
        Default: ``"grid"``."""
        return "grid"

    # ------------------------------------------------------------------------------ outputs
    def read(self, output: Any) -> Gaussian:
        """The prediction inside the model's output, as a Gaussian record.

        Every constraint family reads the same record: a deterministic output is a Gaussian
        without uncertainty (``variance``, ``covariance`` and ``low_rank`` all None; a grid
        output's mean is ``(batch, channels, d1, ..., dn)``); a probabilistic head gives
        ``variance`` (marginal, the mean's shape), ``covariance`` (over the flattened event) or
        ``low_rank``; ``event_ndim`` says how many trailing axes of the mean are one sample.

        Default: a floating-point tensor ``(batch, *event)``, read as a deterministic prediction.
        """
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{self!r}: expected the model's output to be a tensor (batch, *event), got "
                f"{type(output).__name__}. If your model returns another kind of output, register "
                "an adapter whose read() finds the prediction in it "
                "(constraint_layers.adapters.register)."
            )
        if not (output.is_floating_point() or output.is_complex()) or output.ndim < 2:
            raise TypeError(
                f"{self!r}: expected the model's output to be a floating-point tensor of shape "
                f"(batch, *event) (a grid: (batch, channels, d1, ..., dn)), got dtype "
                f"{output.dtype} and shape {tuple(output.shape)}."
            )
        return Gaussian(output, event_ndim=output.ndim - 1)

    def write(self, output: Any, prediction: Gaussian) -> Any:
        """The model's output with its prediction replaced by the constrained one (the same kind
        of object). ``prediction`` has the layout :meth:`read` gave: ``mean``, marginal
        ``variance``, and for a full covariance the ``downdate`` ``F`` (posterior covariance
        ``covariance - F F^T``)."""
        return prediction.mean

    def constrain(self, output: Any, project: Callable[[Gaussian], Gaussian]) -> Any:
        """Apply ``project`` (the constraint step on one prediction) to the model's output.

        Default: one prediction per output. Mixtures (ensembles, latent samples) override this to
        update each member and moment-match.
        """
        return self.write(output, project(self.read(output)))

    # ------------------------------------------------------------------------------ wrappers
    def attach(self, wrapper: nn.Module) -> None:
        """Install per-wrapper hooks (state-dict hooks, kernel refinement). Default: none.

        Hooks placed on the wrapped model must be handed to ``wrapper.add_handle`` so that
        :func:`constraint_layers.unwrap` removes them.
        """

    def wrapper_attribute(self, wrapper: nn.Module, name: str) -> Any:
        """An attribute that the wrapper offers on behalf of the model's library.

        ``wrapper.<name>`` comes here when neither the wrapper nor ``nn.Module`` has ``name``. This
        is how a wrapper offers what the model's own tools call on a model (neuraloperator's
        ``Trainer`` calls ``model.save_checkpoint``) while the core stays free of that library:
        return the attribute (usually a function bound to ``wrapper``), or raise
        ``AttributeError``. Default: no such attributes.

        Parameters
        ----------
        wrapper : nn.Module
            The constraint layer being asked.
        name : str
            The attribute asked for (never a dunder name).

        Raises
        ------
        AttributeError
            The adapter offers no attribute ``name``.
        """
        model = wrapper.__dict__.get("_modules", {}).get("model")
        hint = ""
        if model is not None and hasattr(model, name):
            hint = f"; the wrapped model has it: use wrapped.model.{name}"
        raise AttributeError(f"{type(wrapper).__name__!r} object has no attribute {name!r}{hint}")

    def __repr__(self) -> str:
        return f"<adapter {self.name or type(self).__name__}>"
