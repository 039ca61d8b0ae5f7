"""The adapter interface: how a constraint layer talks to one family of models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from constraint_layers._conservation_ops import Gaussian
from constraint_layers._grid import check_grid

__all__ = ["Adapter"]


class Adapter:
    """How constraint layers call a model and find the quantity to constrain in its output.

    Subclass it for a model family and register it with
    :func:`constraint_layers.adapters.register`. Every method has a default that suits an
    ``nn.Module`` called as ``model(x, ...)`` and returning a channel-first grid tensor; override
    only what differs. Adapters hold no per-model state (one instance serves every model of the
    type); per-wrapper state belongs on the wrapper, set up in :meth:`attach`.

    Attributes
    ----------
    name : str
        Unique name, shown in error messages (default: the class name).
    targets : tuple of type or str
        Model types served, used when the adapter is registered through an entry point.
    """

    name: ClassVar[str] = ""
    targets: ClassVar[tuple[type | str, ...]] = ()

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

    # --------------------------------------------------------------------------- grid outputs
    def grid(self, output: Any) -> Tensor:
        """The channel-first grid ``(batch, channels, d1, ..., dn)`` inside the model's output."""
        return check_grid(output, f"{self.name or type(self).__name__}.grid")

    def with_grid(self, output: Any, grid: Tensor) -> Any:
        """The model's output with its grid replaced by the corrected one (same kind of object)."""
        return grid

    # ---------------------------------------------------------------- conservation outputs
    def gaussian(self, output: Any) -> Gaussian:
        """The (possibly deterministic) Gaussian in the model's output, for conservation.

        Default: a floating-point tensor ``(batch, *event)`` read as a deterministic mean (it is
        projected orthogonally). Override for probabilistic heads: return a
        :class:`~constraint_layers.functional.Gaussian` with ``variance`` (marginal, same shape as
        the mean), ``covariance`` (over the flattened event), or ``low_rank``; ``event_ndim``
        says how many trailing axes of the mean are one sample.
        """
        where = f"{self.name or type(self).__name__}.gaussian"
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{where}: expected the model output to be a tensor (batch, *event), got "
                f"{type(output).__name__}. If your model returns a Gaussian in another form, "
                "register an adapter whose gaussian() reads it "
                "(constraint_layers.adapters.register)."
            )
        if not output.is_floating_point() or output.ndim == 0:
            raise TypeError(
                f"{where}: expected a floating-point tensor of shape (batch, *event), got dtype "
                f"{output.dtype} and shape {tuple(output.shape)}."
            )
        return Gaussian(output, event_ndim=max(output.ndim - 1, 1))

    def with_gaussian(self, output: Any, posterior: Gaussian) -> Any:
        """The model's output with its Gaussian replaced by the posterior (same kind of object).

        ``posterior`` has the layout :meth:`gaussian` gave: ``mean``, marginal ``variance``, and
        for a full covariance the ``downdate`` ``F`` (posterior covariance ``covariance - F F^T``).
        """
        return posterior.mean

    def constrain(self, output: Any, project: Callable[[Gaussian], Gaussian]) -> Any:
        """Apply ``project`` (the constraint update of one Gaussian) to the model's output.

        Default: one Gaussian per output. Mixtures (ensembles, latent samples) override this to
        update each member and moment-match.
        """
        return self.with_gaussian(output, project(self.gaussian(output)))

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
