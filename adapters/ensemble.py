"""Ensembles, MC dropout and latent-sample models: several predictions as one Gaussian mixture.

:class:`Ensemble` turns several predictions of one quantity into an equal-weight mixture:

- a deep ensemble: a list of models, each called once;
- MC dropout: one model called ``passes`` times with its dropout layers active (also in eval
  mode);
- a latent-sample model (a neural process): one call whose output holds the samples along
  ``sample_dim``.

Each member may return a tensor (a point prediction) or a Gaussian (``(mean, variance)``, a dict,
a ``Normal``, a ``MultivariateNormal``: see :mod:`constraint_layers.adapters.generic`). Unwrapped,
the ensemble returns the moment-matched ``(mean, variance)``.

Members with a full covariance (gpytorch GPs, ``torch.distributions.MultivariateNormal``) are
conditioned one by one with their covariance, and the mixture is moment-matched with its dense
covariance (the average of the conditioned covariances plus the covariance of the conditioned
means); the wrapper returns a distribution of the members' type (gpytorch members: a
``ConstrainedMultivariateNormal`` whose samples conserve to rounding and whose ``log_prob`` is the
density on the constraint set). Flat members (GPs) need ``grid_shape=`` as for one GP.

Wrapped with a conservation constraint, its adapter (:class:`EnsembleAdapter`) conditions each
Gaussian member and moment-matches the results with running sums (the ProbConserv rule for latent
samples); the mixture mean conserves exactly. Point predictions are first moment-matched into one
diagonal Gaussian (the ensemble's spread is the uncertainty) and that Gaussian is conditioned, so
the mean moves where the members disagree.

References
----------
Hansen et al., "Learning Physical Models that Can Respect Conservation Laws", ICML 2023 (update per
latent sample, then moment matching). Mouli et al., "Using Uncertainty Quantification to
Characterize and Improve Out-of-Domain Learning for PDEs", ICML 2024 (ensembles, MC dropout and
variance heads of FNOs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from constraint_layers._tolerance import RANK_RCOND
from constraint_layers.conservation.linalg import psd_root
from constraint_layers.functional import Gaussian, RunningMoments

from ._registry import register
from .base import Adapter
from .generic import read_gaussian

__all__ = ["Ensemble", "EnsembleAdapter"]

_UPDATES = ("auto", "members", "moments")


@contextmanager
def _dropout_active(model: nn.Module):
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.train(True)
        yield len(layers)
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


def _split(output: Any, dim: int, where: str) -> list[Any]:
    """Split a tensor / tuple / dict output along ``dim`` into members."""
    if isinstance(output, Tensor):
        return list(output.unbind(dim))
    if isinstance(output, tuple):
        parts = [_split(o, dim, where) for o in output]
        return [tuple(p[i] for p in parts) for i in range(len(parts[0]))]
    if isinstance(output, dict):
        keys = [k for k, v in output.items() if isinstance(v, Tensor)]
        parts = {k: output[k].unbind(dim) for k in keys}
        n = len(next(iter(parts.values())))
        return [{**output, **{k: parts[k][i] for k in keys}} for i in range(n)]
    raise TypeError(
        f"{where}: sample_dim splits tensor, tuple or dict outputs, got {type(output).__name__}."
    )


class Ensemble(nn.Module):
    """Several predictions of one quantity, read as an equal-weight Gaussian mixture.

    Parameters
    ----------
    members : nn.Module or sequence of nn.Module
        The ensemble members; or one model (with ``passes`` or ``sample_dim``).
    passes : int, optional
        MC dropout: call the one model ``passes`` times with its dropout layers active.
    sample_dim : int, optional
        Latent samples: the one model's output holds the members along this axis (of every tensor
        in a tuple or dict output).
    update : {"auto", "members", "moments"}, default "auto"
        How a conservation wrapper updates the mixture: ``"members"`` conditions each member and
        moment-matches (ProbConserv's rule for latent samples); ``"moments"`` moment-matches first
        and conditions the one diagonal Gaussian. ``"auto"``: ``"members"`` for Gaussian members,
        ``"moments"`` for point predictions.

    Notes
    -----
    Shapes: each member returns (batch, *event) (a grid: (batch, channels, d1, ..., dn)); the
    ensemble returns ``(mean, variance)`` of that shape.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> nets = [torch.nn.Conv1d(1, 1, 3, padding=1) for _ in range(4)]
    >>> ens = cl.adapters.Ensemble(nets)
    >>> model = cl.wrap(ens, cl.Conservation.integral(1.0))
    >>> mean, var = model(torch.randn(2, 1, 17))
    >>> float(cl.metrics.conservation_error(mean, model.constraints[0]).abs().max()) < 1e-6
    True
    >>> drop = cl.adapters.Ensemble(torch.nn.Sequential(nets[0], torch.nn.Dropout(0.2)), passes=8)
    >>> drop(torch.randn(2, 1, 17))[1].shape
    torch.Size([2, 1, 17])
    """

    def __init__(
        self,
        members: nn.Module | Sequence[nn.Module],
        *,
        passes: int | None = None,
        sample_dim: int | None = None,
        update: str = "auto",
    ) -> None:
        super().__init__()
        name = "Ensemble"
        if update not in _UPDATES:
            raise ValueError(f"{name}: update must be one of {_UPDATES}, got {update!r}.")
        single = isinstance(members, nn.Module) and not isinstance(members, nn.ModuleList)
        if single:
            if (passes is None) == (sample_dim is None):
                raise ValueError(
                    f"{name}: for one model give exactly one of passes= (MC dropout) or "
                    "sample_dim= (latent samples in its output); for a deep ensemble pass a list "
                    "of models."
                )
            if passes is not None and (isinstance(passes, bool) or int(passes) < 1):
                raise ValueError(f"{name}: passes must be a positive int, got {passes!r}.")
            self.members = nn.ModuleList([members])
        else:
            members = list(members)
            if not members or not all(isinstance(m, nn.Module) for m in members):
                raise TypeError(f"{name}: expected a non-empty sequence of nn.Module members.")
            if passes is not None or sample_dim is not None:
                raise ValueError(
                    f"{name}: passes= and sample_dim= apply to one model, not to a list of members."
                )
            self.members = nn.ModuleList(members)
        self.passes = None if passes is None else int(passes)
        self.sample_dim = sample_dim
        self.update = update

    def member_outputs(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Each member's raw output, one at a time (nothing is stacked)."""
        if self.passes is not None:
            model = self.members[0]
            with _dropout_active(model):
                for _ in range(self.passes):
                    yield model(*args, **kwargs)
        elif self.sample_dim is not None:
            out = self.members[0](*args, **kwargs)
            yield from _split(out, self.sample_dim, "Ensemble")
        else:
            for m in self.members:
                yield m(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The moment-matched ``(mean, variance)`` of the members."""
        acc = RunningMoments()
        for out in self.member_outputs(*args, **kwargs):
            g = read_gaussian(out, "Ensemble")
            acc.add(g.mean, _marginal(g))
        res = acc.result()
        return res.mean, res.variance

    def extra_repr(self) -> str:
        if self.passes is not None:
            return f"passes={self.passes}, update={self.update!r}"
        if self.sample_dim is not None:
            return f"sample_dim={self.sample_dim}, update={self.update!r}"
        return f"update={self.update!r}"


def _marginal(g: Gaussian) -> Tensor | None:
    """The marginal variances of a record (from its covariance or low-rank part when needed)."""
    if g.covariance is not None:
        var = g.covariance.diagonal(dim1=-2, dim2=-1)
        if g.downdate is not None:
            var = var - g.downdate.square().sum(-1).to(var.dtype)
        return var.reshape(g.mean.shape)
    if g.low_rank is not None:
        var = g.low_rank.square().sum(-1)
        return (var if g.variance is None else var + g.variance.reshape(var.shape)).reshape(
            g.mean.shape
        )
    return g.variance


def _dense_covariance(g: Gaussian) -> Tensor:
    """The dense covariance of a full-covariance record (posterior: ``covariance - F F^T``)."""
    cov = g.covariance
    cov = cov if isinstance(cov, Tensor) else cov.to_dense()
    cov = cov.to(torch.float64)
    if g.downdate is not None:
        F = g.downdate.to(torch.float64)
        cov = cov - F @ F.mT
    return cov


class _Members:
    """The members' outputs of one call, produced lazily."""

    def __init__(self, model: Ensemble, args: tuple, kwargs: dict) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        self.first_output: Any = None  # the first member's raw output (its type comes back)

    def __iter__(self) -> Iterator[Gaussian]:
        for out in self.model.member_outputs(*self.args, **self.kwargs):
            if self.first_output is None:
                self.first_output = out
            yield read_gaussian(out, "Ensemble member")


def _moments(gs: Iterator[Gaussian]) -> Gaussian:
    acc = RunningMoments()
    k = 1
    for g in gs:
        acc.add(g.mean, _marginal(g))
        k = g.event_ndim
    res = acc.result()
    return Gaussian(res.mean, res.variance, event_ndim=k)


@register(Ensemble)
class EnsembleAdapter(Adapter):
    """Conditions an :class:`Ensemble` member by member (or its moments), then moment-matches."""

    name = "ensemble"

    def call(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        return _Members(model, args, kwargs)

    def read(self, output: Any) -> Gaussian:
        if isinstance(output, _Members):
            return _moments(iter(output))
        return read_gaussian(output, f"{self.name}.read")

    def write(self, output: Any, posterior: Gaussian) -> Any:
        return posterior.mean, posterior.variance

    def constrain(self, output: Any, project: Callable[[Gaussian], Gaussian]) -> Any:
        if not isinstance(output, _Members):
            return super().constrain(output, project)
        members = iter(output)
        first = next(members, None)
        if first is None:
            raise ValueError("Ensemble: the model produced no members.")
        update = output.model.update
        full = first.covariance is not None
        if update == "auto":
            update = "members" if (first.variance is not None or full) else "moments"
        if update == "moments":
            post = project(_moments(_chain(first, members)))
            return post.mean, post.variance
        if full:
            return _full_mixture(output.first_output, _chain(first, members), project)
        acc = RunningMoments()
        k = first.event_ndim
        for g in _chain(first, members):
            post = project(g)
            acc.add(post.mean, post.variance)
        res = acc.result()
        return self.write(output, Gaussian(res.mean, res.variance, event_ndim=k))


def _chain(first: Gaussian, rest: Iterator[Gaussian]) -> Iterator[Gaussian]:
    yield first
    yield from rest


def _full_mixture(
    like: Any, members: Iterator[Gaussian], project: Callable[[Gaussian], Gaussian]
) -> Any:
    """Condition full-covariance members and moment-match them with the dense covariance.

    Returns a distribution of ``like``'s type: a gpytorch ``MultivariateNormal`` (lazy, with an
    exact root and the degenerate density when the constraints are exact) or a torch one.
    """
    acc = RunningMoments(covariance=True)
    rows = None
    for g in members:
        if g.covariance is None:
            raise TypeError(
                "Ensemble: members must all return a full covariance (a MultivariateNormal), or "
                "none; got a mix."
            )
        post = project(g)
        cg = post.conditioned
        if cg is not None and cg.noise_free:
            rows = (cg._G, cg._b)
        acc.add(post.mean.reshape(*post.mean.shape[:-1], -1), None, _dense_covariance(post))
    res = acc.result()
    cov64 = res.covariance.to(torch.float64)
    if type(like).__module__.startswith("gpytorch"):
        from ._gpytorch_distributions import mixture_distribution

        return mixture_distribution(like, res.mean, cov64, rows)
    from torch.distributions import MultivariateNormal

    root = _projected_root(cov64, rows)
    R = torch.linalg.qr(root.mT, mode="r").R
    sign = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(R.dtype)
    tril = (R * sign.unsqueeze(-1)).mT.to(res.mean.dtype)
    return MultivariateNormal(res.mean, scale_tril=tril, validate_args=False)


def _projected_root(cov: Tensor, rows: tuple[Tensor, Tensor] | None) -> Tensor:
    """A root of ``cov`` (float64, shape (*batch, N, N)) projected onto ``G u = 0``.

    When every member was conditioned exactly, ``G cov = 0``, so ``P_G L`` (``P_G`` the
    orthogonal projector onto the null space of ``G``) is a root of ``cov`` for any root ``L``
    of it, and ``G P_G L = 0`` holds to rounding.
    """
    L = psd_root(cov, RANK_RCOND[torch.float64])  # the density's cutoff; finite backward
    if rows is None:
        return L
    G = rows[0].to(torch.float64)
    GL = G @ L
    return L - G.mT @ torch.linalg.solve(G @ G.mT, GL)
