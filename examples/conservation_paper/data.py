"""The paper's data recipe on the library's closed-form GPME problems, and the run settings.

Per function (one parameter draw): 10 stratified times x 10 sorted uniform positions of context,
10 x 10 target points, and (test functions only) the exact solution on the 201 x 201 uniform
``(t, x)`` grid; metrics at the table time ``t*``. All of it comes from
``cl.problems.<Problem>.neural_process_data`` (see :mod:`constraint_layers.problems`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

import constraint_layers as cl
from constraint_layers.problems import NeuralProcessData

__all__ = ["CONFIGS", "PROBLEMS", "Config", "TestCase", "test_cases", "training_data"]

PROBLEMS: dict[str, type] = {
    "diffusion": cl.problems.Diffusion,
    "porous_medium": cl.problems.PorousMedium,
    "stefan": cl.problems.Stefan,
}
#: Display names and the paper's table scales (MSE and CE are printed times 10^scale).
LABELS = {"diffusion": "Diffusion", "porous_medium": "PME", "stefan": "Stefan"}
MSE_SCALE = {"diffusion": 4, "porous_medium": 4, "stefan": 3}
CE_SCALE = {"diffusion": 3, "porous_medium": 3, "stefan": 3}


@dataclass(frozen=True)
class Config:
    """Budget of one reproduction run (per problem family)."""

    name: str
    n_train: int  # training functions
    epochs: int
    batch: int  # functions per step
    lr: float
    lr_schedule: str  # "constant" (the paper) or "cosine" (decay to 0 over the run)
    hidden: int  # ANP width (the paper: 128)
    dropout: float  # ANP attention dropout, training only
    latent_samples: int  # at inference (the paper: 100)
    n_test: int  # test functions per parameter value (the paper: 50)
    softc_weight: float  # SoftC-ANP: weight of the squared mass error per unit length
    softc_points: int  # SoftC-ANP: uniform x points per target time for the penalty's quadrature
    ens_members: int
    ens_width: int
    ens_steps: int
    ens_batch: int  # points per step
    gp_iters: int  # Adam steps of the marginal likelihood per GP
    gp_times: int  # time rows of the GP's evaluation grid (t* among them)
    fig_times: int  # time rows of the mass-over-time figure
    shock_draws: int  # posterior draws per shock-position histogram
    noise_sweep: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 10.0, 100.0)
    problems: tuple[str, ...] = ("diffusion", "porous_medium", "stefan")
    n_grid_x: int = 201
    n_grid_t: int = 201
    max_steps: int | None = None  # cap on optimiser steps per model (smoke runs)

    def as_dict(self) -> dict:
        return asdict(self)


QUICK = Config(
    name="quick",
    n_train=1000,
    epochs=4,
    batch=10,
    lr=1e-3,
    lr_schedule="cosine",
    hidden=32,
    dropout=0.0,
    latent_samples=50,
    n_test=10,
    softc_weight=100.0,
    softc_points=33,
    ens_members=5,
    ens_width=64,
    ens_steps=600,
    ens_batch=1024,
    gp_iters=60,
    gp_times=11,
    fig_times=51,
    shock_draws=500,
)
FULL = Config(
    name="full",
    n_train=10_000,
    epochs=500,
    batch=250,
    lr=1e-4,
    lr_schedule="constant",
    hidden=128,
    dropout=0.1,
    latent_samples=100,
    n_test=50,
    softc_weight=100.0,
    softc_points=65,
    ens_members=5,
    ens_width=128,
    ens_steps=20_000,
    ens_batch=4096,
    gp_iters=100,
    gp_times=41,
    fig_times=201,
    shock_draws=500,
)
#: For the smoke test: every stage runs, nothing is trained to speak of.
TINY = replace(
    QUICK,
    name="tiny",
    n_train=40,
    epochs=1,
    batch=20,
    hidden=16,
    latent_samples=8,
    n_test=2,
    softc_points=9,
    ens_members=2,
    ens_width=16,
    ens_steps=20,
    ens_batch=256,
    gp_iters=5,
    gp_times=3,
    fig_times=5,
    shock_draws=40,
    noise_sweep=(1e-3, 1.0),
    n_grid_x=41,
    n_grid_t=21,
)
CONFIGS = {"quick": QUICK, "full": FULL, "tiny": TINY}


def training_data(
    problem: str, n: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> NeuralProcessData:
    """``n`` training functions (parameters uniform on the training range), without the grid."""
    cls = PROBLEMS[problem]
    params = cls.train_params(n, seed=seed)
    return cls(params).neural_process_data(seed=seed + 1, dense=False, dtype=dtype)


@dataclass(frozen=True)
class TestCase:
    """The test functions of one parameter value, with the truth at ``t*``."""

    problem: str
    param: float
    data: NeuralProcessData  # n functions with the dense grid (float32 inputs)
    t_star: float
    i_star: int  # the row of the grid at t*
    truth: Tensor  # shape: (n, X), float64: u(t*, x) on the grid
    mass: Tensor  # shape: (n,), float64: the analytic mass at t*
    family: object  # the problem object of the n parameters (float64)

    @property
    def label(self) -> str:
        cls = PROBLEMS[self.problem]
        name = {"u_star": "u*"}.get(cls.param_name, cls.param_name)
        return f"{LABELS[self.problem]} {name}={self.param:g}"

    @property
    def grid_x(self) -> Tensor:  # shape: (X,) float64
        return self.data.grid_x.to(torch.float64)

    def __len__(self) -> int:
        return len(self.data)


def test_cases(problem: str, cfg: Config, seed: int = 12345) -> list[TestCase]:
    """One :class:`TestCase` per test parameter value of ``problem`` (``cfg.n_test`` each)."""
    cls = PROBLEMS[problem]
    out = []
    for j, value in enumerate(cls.TEST_PARAMS):
        params = torch.full((cfg.n_test,), float(value), dtype=torch.float64)
        family = cls(params)
        data = family.neural_process_data(
            seed=seed + j,
            n_grid_t=cfg.n_grid_t,
            n_grid_x=cfg.n_grid_x,
            dtype=torch.float32,
        )
        t_star = float(cls.t_star)
        grid_t = torch.linspace(*cls.t_range, cfg.n_grid_t, dtype=torch.float64)
        i_star = int((grid_t - t_star).abs().argmin())
        if abs(float(grid_t[i_star]) - t_star) > 1e-12:
            raise ValueError(f"{problem}: t* = {t_star} is not a node of the evaluation grid.")
        x = torch.linspace(*cls.domain, cfg.n_grid_x, dtype=torch.float64)
        truth = family.on_grid(torch.tensor([t_star], dtype=torch.float64), x)[:, 0]
        mass = cls(params).mass(torch.full_like(params, t_star))
        out.append(TestCase(problem, float(value), data, t_star, i_star, truth, mass, family))
    return out
