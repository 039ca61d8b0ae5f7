"""PDE problems with exact or trusted reference solutions, and their data sets.

Closed forms of the conservation paper (ProbConserv): :class:`Diffusion`, :class:`PorousMedium`,
:class:`Stefan`, :class:`LinearAdvection`, :class:`InviscidBurgers`, with analytic masses,
parameter samplers and neural-process / operator-style data.

Numerical references of the boundary paper (BOON): :class:`Heat` (Neumann), :class:`Stokes`
(Dirichlet), :class:`Burgers` (periodic or Dirichlet), :class:`Cavity` (2D lid-driven cavity,
Dirichlet), each with a vectorised solver and ``generate`` (seeded, cached on disk, small or paper
sizes) returning :class:`OperatorData` in the channel-first layout of neuraloperator.

Point clouds: :class:`PotentialFlow` (uniform flow past a cylinder, closed form) at scattered
query points, :class:`PointCloudData`.

Examples
--------
>>> import constraint_layers as cl
>>> float(cl.problems.Stefan(0.6).front(0.05)) > 0.235
True
>>> data = cl.problems.Heat().generate(4, resolution=33, cache=False)
>>> data.y.shape
torch.Size([4, 1, 33, 25])
"""

from __future__ import annotations

from .burgers import Burgers
from .cache import CacheError, resolve_cache_dir
from .cavity import Cavity, poisson_dirichlet
from .closed_form import ClosedForm
from .data import OperatorData, OperatorDataset, add_coordinates
from .gpme import (
    Diffusion,
    InviscidBurgers,
    LinearAdvection,
    PorousMedium,
    Stefan,
    stefan_z1,
)
from .grf import evaluate_fourier, periodic_grf, sine_series
from .heat import Heat
from .navier_stokes import NavierStokes2D
from .neural_process import NeuralProcessData, sample_neural_process
from .potential_flow import PointCloudData, PotentialFlow
from .stokes import Stokes

__all__ = [
    "Burgers",
    "CacheError",
    "Cavity",
    "ClosedForm",
    "Diffusion",
    "Heat",
    "InviscidBurgers",
    "LinearAdvection",
    "NavierStokes2D",
    "NeuralProcessData",
    "OperatorData",
    "OperatorDataset",
    "PointCloudData",
    "PorousMedium",
    "PotentialFlow",
    "Stefan",
    "Stokes",
    "add_coordinates",
    "evaluate_fourier",
    "periodic_grf",
    "poisson_dirichlet",
    "resolve_cache_dir",
    "sample_neural_process",
    "sine_series",
    "stefan_z1",
]
