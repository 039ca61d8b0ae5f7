"""Operator-learning data: (input function, output grid) pairs in the channel-first layout.

Layout (what neuraloperator's models and the boundary layer expect):

- single step: ``x`` of shape ``(n, C_in, N)``, ``y`` of shape ``(n, 1, N)``;
- several frames: time is the LAST grid axis, ``x`` of shape ``(n, C_in, N, T)`` (the initial
  condition repeated along ``T``) and ``y`` of shape ``(n, 1, N, T)``;
- 2D (cavity): ``(n, C_in, Nx, Ny, T)`` and ``(n, 1, Nx, Ny, T)``.

``coords`` maps each grid axis name to its coordinates (both ends included). With coordinate
channels (``coords=True`` when generating, or :func:`add_coordinates`) ``x`` gains one channel per
grid axis after the data channels, holding the coordinate of each node: neuraloperator's default
positional embedding leaves out ``x = 1``, these channels do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["OperatorData", "OperatorDataset", "add_coordinates"]


def add_coordinates(x: Tensor, coords: Mapping[str, Tensor]) -> Tensor:
    """Append one channel per grid axis holding that axis' coordinates.

    Parameters
    ----------
    x : Tensor
        shape: (n, C, d1, ..., dk)
    coords : mapping of axis name to a 1-D tensor
        In axis order; ``coords`` values have shapes ``(d1,), ..., (dk,)``.

    Returns
    -------
    Tensor
        shape: (n, C + k, d1, ..., dk), the dtype and device of ``x``.

    Examples
    --------
    >>> import torch
    >>> from constraint_layers.problems import add_coordinates
    >>> x = torch.zeros(2, 1, 3, 4)
    >>> out = add_coordinates(x, {"x": torch.linspace(0, 1, 3), "t": torch.arange(1.0, 5.0)})
    >>> out.shape
    torch.Size([2, 3, 3, 4])
    >>> out[0, 1, :, 0].tolist(), out[0, 2, 0, :].tolist()
    ([0.0, 0.5, 1.0], [1.0, 2.0, 3.0, 4.0])
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"add_coordinates: x must be a Tensor, got {type(x).__name__}.")
    axes = list(coords.values())
    grid_shape = tuple(x.shape[2:])
    if len(axes) != len(grid_shape) or any(
        c.ndim != 1 or c.numel() != s for c, s in zip(axes, grid_shape)
    ):
        raise ValueError(
            f"add_coordinates: expected one 1-D coordinate tensor per grid axis of x "
            f"{grid_shape}, got shapes {[tuple(c.shape) for c in axes]}."
        )
    n = x.shape[0]
    chans = []
    for i, c in enumerate(axes):
        view = [1] * len(grid_shape)
        view[i] = -1
        chans.append(c.to(x).reshape(1, 1, *view).expand(n, 1, *grid_shape))
    return torch.cat([x, *chans], dim=1)


@dataclass
class OperatorData:
    """A set of (input function, output grid) pairs.

    Attributes
    ----------
    x : Tensor
        shape: (n, C_in, *grid). The input function (e.g. the initial condition, repeated along the
        time axis for several frames), then the coordinate channels if asked for. Without
        coordinate channels the repetition along time is an expanded view (no memory): call
        ``.contiguous()`` before editing it in place.
    y : Tensor
        shape: (n, 1, *grid). The solution on the grid.
    coords : dict of str to Tensor
        The coordinates of each grid axis in order (e.g. ``{"x": (N,), "t": (T,)}``); both ends
        of every closed interval are included.
    params : dict of str to Tensor
        Per-sample parameters, leading axis ``n`` (e.g. ``"omega"``).
    boundary : dict of str to Tensor
        Boundary data held by ``y``, keyed ``"<axis>_low"`` / ``"<axis>_high"``, each shaped like
        the face of one channel, ``(n, 1, *face dims)``, so it can be passed as the ``value`` of a
        :class:`constraint_layers.Dirichlet` or :class:`constraint_layers.Neumann` condition on the
        same samples. ``meta["bc"]`` says which kind; Neumann values are OUTWARD-normal derivatives.
    meta : dict
        The problem, its constants, the generation parameters and the layout.

    Examples
    --------
    >>> from constraint_layers.problems import Heat
    >>> data = Heat().generate(8, resolution=33, cache=False)
    >>> data.x.shape, data.y.shape, tuple(data.coords)
    (torch.Size([8, 1, 33, 25]), torch.Size([8, 1, 33, 25]), ('x', 't'))
    >>> train, test = data.split(6)
    >>> len(train), len(test)
    (6, 2)
    >>> sorted(data.dataset()[0])
    ['x', 'y']
    """

    x: Tensor
    y: Tensor
    coords: dict[str, Tensor]
    params: dict[str, Tensor] = field(default_factory=dict)
    boundary: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def axes(self) -> tuple[str, ...]:
        """The names of the grid axes, in order (e.g. ``("x", "t")``)."""
        return tuple(self.coords)

    def subset(self, index: slice | Sequence[int] | Tensor) -> OperatorData:
        """The samples selected by ``index`` along the leading axis (views where possible)."""

        def take(t: Tensor) -> Tensor:
            return t[index]

        return replace(
            self,
            x=take(self.x),
            y=take(self.y),
            params={k: take(v) for k, v in self.params.items()},
            boundary={k: take(v) for k, v in self.boundary.items()},
            meta=dict(self.meta),
        )

    def split(self, n_first: int) -> tuple[OperatorData, OperatorData]:
        """The first ``n_first`` samples and the rest (e.g. train and test)."""
        if isinstance(n_first, bool) or not isinstance(n_first, int):
            raise TypeError(f"OperatorData.split: n_first must be an int, got {n_first!r}.")
        if not 0 < n_first < len(self):
            raise ValueError(
                f"OperatorData.split: n_first must be between 1 and {len(self) - 1} for "
                f"{len(self)} samples, got {n_first}."
            )
        return self.subset(slice(0, n_first)), self.subset(slice(n_first, None))

    def with_coordinates(self) -> OperatorData:
        """A copy whose ``x`` gains the coordinate channels (see :func:`add_coordinates`)."""
        if self.meta.get("coordinate_channels"):
            return self
        meta = dict(self.meta, coordinate_channels=True)
        return replace(self, x=add_coordinates(self.x, self.coords), meta=meta)

    def dataset(self, keys: Sequence[str] = ("x", "y")) -> OperatorDataset:
        """A ``torch.utils.data.Dataset`` of dicts (``{"x": ..., "y": ...}`` by default), the
        format neuraloperator's ``Trainer`` consumes."""
        return OperatorDataset(self, keys)


class OperatorDataset(Dataset):
    """Dataset view of :class:`OperatorData`: item ``i`` is a dict of the chosen per-sample tensors.

    Parameters
    ----------
    data : OperatorData
    keys : sequence of str, default ("x", "y")
        ``"x"``, ``"y"``, or the name of an entry of ``data.params`` or ``data.boundary``.
        neuraloperator's Trainer passes every key to the model as a keyword, so keep the default
        unless the model accepts the extra ones.
    """

    def __init__(self, data: OperatorData, keys: Sequence[str] = ("x", "y")) -> None:
        if not isinstance(data, OperatorData):
            raise TypeError(
                f"OperatorDataset: data must be an OperatorData, got {type(data).__name__}."
            )
        available = {"x": data.x, "y": data.y, **data.params, **data.boundary}
        missing = [k for k in keys if k not in available]
        if missing:
            raise ValueError(
                f"OperatorDataset: unknown keys {missing}; available: {sorted(available)}."
            )
        self._tensors = {k: available[k] for k in keys}
        self._n = len(data)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self._tensors.items()}
