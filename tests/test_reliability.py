"""Reliability: one flat table of bad (and borderline good) inputs, called the way users call.

Every case is written as a user would write it (``cl.wrap(model, ...)(x)``, ``cl.Dirichlet(...)``,
the functional API, gpytorch / neuraloperator models) and states the expected outcome:

- ``Raises(type, regex)``: a clear exception of that type whose message matches ``regex`` (the
  regex checks that it names the user's call, what was expected and what was given) and names
  no private object (``_Members``, ``torch.nn.Module.grid``, ``builtins.function``);
- ``Accepts(check)``: the input is valid; ``check(result)`` says whether the result is right.

:func:`outcome` sorts every case into one of the audit's classes; the test asserts the expected
one, and ``python tests/reliability_audit.py`` prints the table over all cases.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers.errors import (
    CheckpointError,
    ConstraintError,
    ConstraintViolationError,
    GridError,
    IncompatibleConstraintsError,
    NoAdapterError,
    SingularConstraintError,
)

F64 = torch.float64
F32 = torch.float32
NAN, INF = math.nan, math.inf


# ------------------------------------------------------------------------------ the harness
@dataclass(frozen=True)
class Raises:
    exc: type | tuple[type, ...]
    match: str  # regex, searched in the message (DOTALL, case-insensitive)


@dataclass(frozen=True)
class Accepts:
    check: Callable[[Any], bool]


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[], Any]
    expect: Raises | Accepts
    slow: bool = False


#: Names a user never wrote: private classes, the generic adapter's registry key, raw builtins.
PRIVATE = re.compile(r"(?<![\w.])_[A-Za-z]\w*|torch\.nn\.Module\.\w+|builtins\.|<locals>")

CLASSES = (
    "clear error",
    "accepted correctly",
    "unclear error",
    "wrongly rejected",
    "silent NaN/inf",
    "silently wrong",
)


def _nonfinite(result: Any) -> bool:
    """Whether a result (tensor, tuple, dict, distribution) holds NaN or inf anywhere."""
    if isinstance(result, torch.Tensor):
        return not bool(torch.isfinite(result.detach()).all())
    if isinstance(result, (tuple, list)):
        return any(_nonfinite(r) for r in result)
    if isinstance(result, dict):
        return any(_nonfinite(r) for r in result.values())
    for attr in ("mean", "loc", "variance"):
        v = getattr(result, attr, None)
        if isinstance(v, torch.Tensor) and _nonfinite(v):
            return True
    return False


def outcome(case: Case) -> tuple[str, str]:
    """``(class, detail)`` of one case; the class is one of :data:`CLASSES`."""
    exp = case.expect
    try:
        result = case.run()
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        if isinstance(exp, Accepts):
            return "wrongly rejected", msg
        if not isinstance(e, exp.exc):
            return "unclear error", f"wrong type; {msg}"
        if not re.search(exp.match, str(e), re.S | re.I):
            return "unclear error", f"message does not match {exp.match!r}; {msg}"
        if PRIVATE.search(str(e)):
            return "unclear error", f"names a private object; {msg}"
        return "clear error", msg
    if isinstance(exp, Raises):
        if _nonfinite(result):
            return "silent NaN/inf", "returned NaN/inf instead of raising"
        return "silently wrong", "returned a result instead of raising"
    try:
        ok = bool(exp.check(result))
    except Exception as e:
        ok, why = False, f"check raised {type(e).__name__}: {e}"
    else:
        why = "check failed"
    if ok:
        return "accepted correctly", ""
    if _nonfinite(result):
        return "silent NaN/inf", "result holds NaN/inf"
    return "silently wrong", why


# ----------------------------------------------------------------------------- tiny models
class Fn(nn.Module):
    """A model that applies ``f`` to its input (one learnable scale, so it has parameters)."""

    def __init__(self, f: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.f = f
        self.scale = nn.Parameter(torch.ones((), dtype=F64))

    def forward(self, x):
        return self.f(x * self.scale.to(x.dtype) if x.is_floating_point() else x)


class KwNet(nn.Module):
    """A model that takes no keyword arguments."""

    def forward(self, x):
        return torch.sin(x)


def x1(batch=2, n=9, dtype=F64):
    """A 1-D grid input (batch, 1, n), deterministic."""
    g = torch.linspace(0, 1, n, dtype=dtype)
    return (torch.arange(1, batch + 1, dtype=dtype).reshape(-1, 1, 1) * torch.cos(3 * g)).clone()


def x2(batch=2, n=7, t=5, dtype=F64):
    g = torch.linspace(0, 1, n, dtype=dtype).reshape(-1, 1)
    s = torch.linspace(0, 1, t, dtype=dtype).reshape(1, -1)
    return (torch.cos(3 * g + s)).expand(batch, 1, n, t).clone()


class Pair(NamedTuple):
    u: torch.Tensor
    v: torch.Tensor


def det(f=torch.sin):
    return Fn(f)


def head(var=lambda x: 0.1 + x**2, mean=torch.sin):
    """(mean, variance) head."""
    return Fn(lambda x: (mean(x), var(x)))


def dict_head(**entries):
    return Fn(lambda x: {k: f(x) for k, f in entries.items()})


def normal_head(scale=lambda x: 0.3 + x.abs()):
    return Fn(lambda x: torch.distributions.Normal(torch.sin(x), scale(x), validate_args=False))


def mvn_head(cov_nan=False):
    def f(x):
        mean = torch.sin(x).reshape(x.shape[0], -1)
        n = mean.shape[-1]
        g = torch.linspace(0, 1, n, dtype=x.dtype)
        cov = torch.exp(-((g[:, None] - g[None]) ** 2) / 0.1) + 1e-3 * torch.eye(n, dtype=x.dtype)
        tril = torch.linalg.cholesky(cov)
        if cov_nan:  # a root the model computed badly (the constructor does not factor it)
            tril = tril.clone()
            tril[3, 2] = NAN
        return torch.distributions.MultivariateNormal(mean, scale_tril=tril, validate_args=False)

    return Fn(f)


def gp(nan_targets=False):
    import gpytorch

    class GP(gpytorch.models.ExactGP):
        def __init__(self, x, y):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.RBFKernel()

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    x = torch.linspace(0, 1, 6, dtype=F64)
    y = torch.sin(6 * x)
    if nan_targets:
        y = y.clone()
        y[2] = NAN
    return GP(x, y).double().eval()


def fno(n_modes=(4,), dtype=F64):
    from _models import fno as make

    torch.manual_seed(0)
    return make(n_modes, dtype=dtype)


# ------------------------------------------------------------------------------- checks
def faces(y, v, dim=-1):
    """Both end faces along ``dim`` equal ``v`` to the bit."""
    lo, hi = y.select(dim, 0), y.select(dim, -1)
    v = torch.as_tensor(v, dtype=y.dtype)
    return bool((lo == v).all() and (hi == v).all())


def conserved(y, c, tol=1e-9, **given):
    err = cl.metrics.conservation_error(y, c, **given) if given else None
    if err is None:
        err = cl.metrics.conservation_error(y, c)
    return bool(err.abs().max() < tol)


def total(y, value, tol=1e-9):
    """The trapezoid integral over the first spatial axis of (batch, 1, n) equals ``value``."""
    w = cl.quadrature.trapezoid(y.shape[-1], dtype=F64)
    return bool(((y.to(F64) @ w) - value).abs().max() < tol)


def shape_is(*shape):
    return lambda y: tuple(y.shape) == shape


def near_faces(y, v, tol=1e-12):
    """Both end faces equal ``v`` to rounding (Gaussian conditioning is exact to rounding)."""
    y = y.detach().to(F64)
    return bool(((y[..., 0] - v).abs().max() <= tol * (1 + abs(v))) and
                ((y[..., -1] - v).abs().max() <= tol * (1 + abs(v))))  # fmt: skip


def gaussian_faces(out, v=0.0):
    """Mean at the walls equals ``v`` and the variance there is 0, both to rounding."""
    mean, var = out
    scale = float(var.detach().abs().max())
    return near_faces(mean, v) and near_faces(var, 0.0, 1e-12 * scale)


def _param(value):
    return nn.Parameter(torch.as_tensor(value, dtype=F64))


def _poisoned_param():
    """A learnable boundary value that an optimizer step has made NaN after construction."""
    p = _param(1.0)
    bc = cl.Dirichlet(p)
    with torch.no_grad():
        p.fill_(NAN)
    return bc


def _poisoned_total():
    p = _param(1.0)
    c = cl.Conservation.integral(p)
    with torch.no_grad():
        p.fill_(INF)
    return c


class Norm:
    """An affine output normaliser (neuraloperator's interface)."""

    def __init__(self, mean=0.5, std=2.0):
        self.mean, self.std = mean, std

    def transform(self, x):
        return (x - self.mean) / self.std

    def inverse_transform(self, x):
        return x * self.std + self.mean


def _compiled_given_nan():
    model = cl.wrap(nn.Conv1d(1, 1, 3, padding=1).double(), cl.Dirichlet(cl.Given("g")))
    fast = torch.compile(model, backend="eager")
    x = torch.randn(2, 1, 9, dtype=F64)
    if not faces(fast(x, g=torch.zeros(2, 1, dtype=F64)), 0.0):  # compiles, and is right
        raise AssertionError("the compiled wrapper gave a wrong result on valid input")
    return fast(x, g=torch.full((2, 1), NAN, dtype=F64))


def _compiled_ok():
    model = cl.wrap(nn.Conv1d(1, 1, 3, padding=1).double(), cl.Dirichlet(cl.Given("g")))
    fast = torch.compile(model, backend="eager")
    return fast(torch.randn(2, 1, 9, dtype=F64), g=torch.ones(2, 1, dtype=F64))


def _ensemble(*fs):
    return cl.adapters.Ensemble([Fn(f) for f in fs])


class Unregistered(nn.Module):
    """A model type for the registry cases."""


def _register_twice():
    M = Unregistered

    @cl.adapters.register(M)
    class A(cl.adapters.Adapter):
        name = "reliability-a"

    try:

        @cl.adapters.register(M)
        class B(cl.adapters.Adapter):
            name = "reliability-b"

    finally:
        cl.adapters.unregister(A)


def _no_mutation():
    """A wrapped call leaves the caller's tensors as they were (output, value, total)."""
    value = torch.full((2, 1), 3.0, dtype=F64)
    tot = torch.ones(2, 1, dtype=F64)
    out = x1()
    keep = (value.clone(), tot.clone(), out.clone())
    model = cl.wrap(Fn(lambda x: out), cl.Dirichlet(value), cl.Conservation.integral(tot))
    y = model(x1())
    ok = torch.equal(value, keep[0]) and torch.equal(tot, keep[1]) and torch.equal(out, keep[2])
    return ok and faces(y, 3.0) and total(y, 1.0)


def _grad_flows():
    p = _param(2.0)
    model = cl.wrap(det(), cl.Dirichlet(p))
    model(x1()).sum().backward()
    return p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad) != 0


# ---------------------------------------------------------- training harnesses (issue 19)
def _fno32(n_layers=1):
    from _models import fno as make

    torch.manual_seed(0)
    return make((4,), hidden=4, n_layers=n_layers)


def _inference_then_train(*constraints, **options):
    """A call under inference_mode (Lightning's validation), then a training step of the same
    wrapper and of a new one with the same constraints; returns the second output."""
    x = torch.randn(2, 1, 16)
    wrapped = cl.wrap(_fno32(), *constraints, **options)
    with torch.inference_mode():
        wrapped(x)
    wrapped(x).square().mean().backward()
    other = cl.wrap(_fno32(), *constraints, **options)
    y = other(x)
    y.square().mean().backward()
    return y


def _refine_bf16():
    wrapped = cl.wrap(_fno32(), cl.Dirichlet(0.5), mode="refine")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return wrapped(torch.randn(2, 1, 16))


def _compiled_refine_adapter():
    wrapped = cl.wrap(torch.compile(_fno32(), backend="eager"), cl.Dirichlet(0.0), mode="refine")
    return wrapped.adapter.name, len(wrapped.refinements)


def _compiled_save_checkpoint():
    import tempfile
    from pathlib import Path

    wrapped = cl.wrap(torch.compile(_fno32(), backend="eager"), cl.Dirichlet(0.0))
    with tempfile.TemporaryDirectory() as folder:
        wrapped.save_checkpoint(folder, "m")
        return torch.load(Path(folder) / "m_state_dict.pt", weights_only=True)


def _cast(how, mode="refine"):
    return how(cl.wrap(_fno32(), cl.Dirichlet(0.0), mode=mode))


def _made_real_behind():
    inner = _fno32()
    wrapped = cl.wrap(inner, cl.Dirichlet(0.0), mode="refine")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner.to(F64)
    return wrapped(torch.randn(2, 1, 16, dtype=F64))


def _trace(*constraints, **options):
    wrapped = cl.wrap(_fno32(), *constraints, **options)
    return torch.jit.trace(wrapped, torch.randn(2, 1, 16), check_trace=False)


W = cl.wrap
D, N, P, C = cl.Dirichlet, cl.Neumann, cl.Periodic, cl.Conservation
I = cl.Conservation.integral
G6 = torch.ones(1, 9, dtype=F64) / 9  # a mean-value row on 9 points


# ----------------------------------------------------------------- issue 19: files, messages
def _fno2d(seed=0):
    import warnings

    from neuralop.models import FNO

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FNO(n_modes=(4, 4), in_channels=1, out_channels=1, hidden_channels=4)


def _in_tmp(f):
    """Run ``f(folder)`` in a fresh temporary folder."""
    import tempfile
    from pathlib import Path

    def run():
        with tempfile.TemporaryDirectory() as folder:
            return f(Path(folder))

    return run


def _payload_sidecar(folder):
    """A pickled sidecar holding a payload: loading must neither run it nor pass silently."""
    import os

    from constraint_layers.adapters.neuralop import LEGACY_SIDECAR_SUFFIX, SIDECAR_SUFFIX

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'pwned'}",))

    W(_fno2d(), D(0.0, dim=0)).save_checkpoint(folder, "m")
    (folder / f"m{SIDECAR_SUFFIX}").unlink()
    torch.save({"constraints": [Payload()]}, folder / f"m{LEGACY_SIDECAR_SUFFIX}")
    try:
        return cl.adapters.neuralop.from_checkpoint(folder, "m")
    finally:
        if (folder / "pwned").exists():
            raise AssertionError("the payload ran")


def _copied_sidecar(folder):
    import shutil

    from constraint_layers.adapters.neuralop import SIDECAR_SUFFIX

    W(_fno2d(0), N(0.0, dim=0)).save_checkpoint(folder / "a", "model")
    W(_fno2d(1), D(0.0, dim=0)).save_checkpoint(folder / "b", "model")
    shutil.copy(folder / "b" / f"model{SIDECAR_SUFFIX}", folder / "a")
    return cl.adapters.neuralop.from_checkpoint(folder / "a", "model")


def _empty_sidecar(folder):
    from constraint_layers.adapters.neuralop import SIDECAR_SUFFIX

    W(_fno2d(), D(0.0, dim=0)).save_checkpoint(folder, "m")
    (folder / f"m{SIDECAR_SUFFIX}").write_bytes(b"")
    return cl.adapters.neuralop.from_checkpoint(folder, "m")


def _refine_as_plain(folder):
    import warnings

    from neuralop.models import FNO

    W(_fno2d(), D(0.0, dim=0), D(0.0, dim=1), mode="refine").save_checkpoint(folder, "r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FNO.from_checkpoint(folder, "r")


def _trainer_without_normalizer():
    import warnings

    from neuralop import Trainer
    from neuralop.data.transforms.data_processors import DefaultDataProcessor
    from neuralop.data.transforms.normalizers import UnitGaussianNormalizer
    from neuralop.losses import LpLoss

    x, y = torch.rand(4, 1, 8, 8) + 3, torch.rand(4, 1, 8, 8) + 5
    norm = UnitGaussianNormalizer(dim=[0, 2, 3])
    norm.fit(y)
    processor = DefaultDataProcessor(out_normalizer=norm)
    model = W(_fno2d().float(), D(0.0, dim=0), D(0.0, dim=1))
    loader = torch.utils.data.DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=2)
    trainer = Trainer(model=model, n_epochs=1, data_processor=processor, verbose=False)
    opt = torch.optim.Adam(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(loader, {}, opt, torch.optim.lr_scheduler.StepLR(opt, 10),
                      training_loss=LpLoss(d=2))  # fmt: skip
    return model


def _set_own_attributes():
    """The wrapper's own options, and names the model lacks, are set as ever."""
    wrapped = W(_fno2d(), D(0.0, dim=0))
    wrapped.debug = True
    wrapped.note = "mine"
    wrapped.model.n_modes = (2, 2)
    return wrapped


def _set_model_attribute():
    wrapped = W(_fno2d(), D(0.0, dim=0))
    wrapped.n_modes = (2, 2)
    return wrapped


class _Aux(nn.Module):
    def forward(self, x):
        return (x, x - 5.0)


def R(exc, match):
    return Raises(exc, match)


def A(check):
    return Accepts(check)


OK = A(lambda r: True)
# --------------------------------------------------------------------------------- the table
CASES: list[Case] = [
    # ---- boundary conditions: construction -------------------------------------------------
    Case("Dirichlet(nan)", lambda: D(NAN), R(ValueError, r"Dirichlet.*finite.*nan")),
    Case("Dirichlet(inf)", lambda: D(INF), R(ValueError, r"Dirichlet.*finite.*inf")),
    Case("Dirichlet(-inf) low", lambda: D(-INF, side="low"), R(ValueError, r"Dirichlet.*finite")),
    Case("Dirichlet('a')", lambda: D("a"), R(TypeError, r"Dirichlet.*number.*tensor.*got str")),
    Case("Dirichlet(True)", lambda: D(True), R(TypeError, r"Dirichlet.*number.*got bool")),
    Case("Dirichlet(None)", lambda: D(None), R(TypeError, r"Dirichlet.*number.*got NoneType")),
    Case("Dirichlet([1, 2])", lambda: D([1.0, 2.0]), R(TypeError, r"Dirichlet.*tensor.*got list")),
    Case(
        "Dirichlet(tensor NaN)",
        lambda: D(torch.tensor([1.0, NAN])),
        R(ValueError, r"Dirichlet.*NaN or inf.*expected finite"),
    ),
    Case(
        "Dirichlet(tensor inf)",
        lambda: D(torch.tensor(INF)),
        R(ValueError, r"Dirichlet.*NaN or inf"),
    ),
    Case(
        "Dirichlet side='left'", lambda: D(0.0, side="left"), R(ValueError, r"side.*one of.*left")
    ),
    Case("Dirichlet dim=1.5", lambda: D(0.0, dim=1.5), R(TypeError, r"Dirichlet.*dim.*int.*1\.5")),
    Case("Dirichlet dim='x'", lambda: D(0.0, dim="x"), R(TypeError, r"Dirichlet.*dim.*int.*'x'")),
    Case("Dirichlet channels=[]", lambda: D(0.0, channels=[]), R(ValueError, r"channels.*empty")),
    Case(
        "Dirichlet channels dup",
        lambda: D(0.0, channels=[0, 0]),
        R(ValueError, r"Dirichlet.*channels.*duplicates.*\(0, 0\)"),
    ),
    Case(
        "Dirichlet channels='a'",
        lambda: D(0.0, channels="a"),
        R(TypeError, r"Dirichlet.*channels.*int.*got str"),
    ),
    Case(
        "Dirichlet channels=[0.5]",
        lambda: D(0.0, channels=[0.5]),
        R(TypeError, r"Dirichlet.*channels.*int.*0\.5"),
    ),
    Case(
        "Neumann order=4", lambda: N(0.0, order=4), R(ValueError, r"Neumann.*order.*\[1, 2, 3\].*4")
    ),
    Case("Neumann order='2'", lambda: N(0.0, order="2"), R(ValueError, r"Neumann.*order.*'2'")),
    Case("Neumann(nan)", lambda: N(NAN), R(ValueError, r"Neumann.*finite.*nan")),
    Case("Periodic dim='x'", lambda: P(dim="x"), R(TypeError, r"Periodic.*dim.*int")),
    Case("Given('1a')", lambda: cl.Given("1a"), R(ValueError, r"Given.*identifier.*'1a'")),
    Case("Given(3)", lambda: cl.Given(3), R((ValueError, TypeError), r"Given.*name.*3")),
    # ---- conservation constraints: construction --------------------------------------------
    Case(
        "Conservation(list)", lambda: C([[1.0] * 9]), R(TypeError, r"Conservation.*G.*tensor.*list")
    ),
    Case(
        "Conservation(G 4-D)",
        lambda: C(torch.ones(1, 1, 1, 9)),
        R(ValueError, r"Conservation.*G.*\(M, N\).*\(1, 1, 1, 9\)"),
    ),
    Case(
        "Conservation(G NaN)",
        lambda: C(torch.tensor([[1.0, NAN]])),
        R(ValueError, r"Conservation.*G.*NaN"),
    ),
    Case("Conservation(b=nan)", lambda: C(G6, NAN), R(ValueError, r"Conservation.*finite.*nan")),
    Case("Conservation(b='x')", lambda: C(G6, "x"), R(TypeError, r"Conservation.*number.*got str")),
    Case(
        "Conservation(b tensor inf)",
        lambda: C(G6, torch.tensor([INF])),
        R(ValueError, r"Conservation.*NaN or inf"),
    ),
    Case(
        "Conservation(complex G)",
        lambda: C(torch.ones(1, 9, dtype=torch.complex128)),
        R(TypeError, r"Conservation.*G.*real.*complex128"),
    ),
    Case(
        "Conservation(int G)",
        lambda: C(torch.ones(1, 9, dtype=torch.int64)).G.dtype,
        A(lambda d: d == F64),
    ),
    Case(
        "integral dim=1.5",
        lambda: I(0.0, dim=1.5),
        R(TypeError, r"Conservation.integral.*dim.*int.*1\.5"),
    ),
    Case(
        "integral dim=[0, 0]",
        lambda: I(0.0, dim=[0, 0]),
        R(ValueError, r"integral.*dim.*duplicates"),
    ),
    Case("integral dim=[]", lambda: I(0.0, dim=[]), R(TypeError, r"integral.*dim.*\[\]")),
    Case(
        "integral rule='simps'",
        lambda: I(0.0, rule="simps"),
        R(ValueError, r"integral.*rule.*one of.*'simps'"),
    ),
    Case(
        "integral rule per axis",
        lambda: I(0.0, rule=["trapezoid", "simpson"]),
        R(ValueError, r"integral.*rule.*one per integrated axis \(1\), got 2"),
    ),
    Case(
        "integral spacing=-1",
        lambda: I(0.0, spacing=-1.0),
        R(ValueError, r"integral.*spacing.*positive.*-1"),
    ),
    Case(
        "integral spacing='a'",
        lambda: I(0.0, spacing="a"),
        R(TypeError, r"integral.*spacing.*one value.*got str"),
    ),
    Case(
        "integral extent=nan",
        lambda: I(0.0, extent=NAN),
        R(ValueError, r"integral.*extent.*finite.*nan"),
    ),
    Case(
        "integral spacing+extent",
        lambda: I(0.0, spacing=0.1, extent=1.0),
        R(ValueError, r"integral.*at most one of spacing=, extent="),
    ),
    Case(
        "integral channels=[]",
        lambda: I(0.0, channels=[]),
        R(ValueError, r"integral.*channels.*non-empty"),
    ),
    Case("integral total=nan", lambda: I(NAN), R(ValueError, r"integral.*finite.*nan")),
    Case("integral total='a'", lambda: I("a"), R(TypeError, r"integral.*number.*got str")),
    Case(
        "integral grid unsorted",
        lambda: I(0.0, grid=torch.tensor([0.0, 0.5, 0.2, 1.0])),
        R(ValueError, r"sorted|increasing"),
    ),
    Case(
        "integral grid NaN",
        lambda: I(0.0, grid=torch.tensor([0.0, NAN, 1.0])),
        R(ValueError, r"(NaN|finite|sorted|increasing)"),
    ),
    Case(
        "mass_over_time t and dt",
        lambda: cl.mass_over_time(1.0, torch.ones(3), t=torch.arange(3.0), dt=0.1),
        R(ValueError, r"mass_over_time.*t=.*dt=.*not both"),
    ),
    Case(
        "mass_over_time const no times",
        lambda: cl.mass_over_time(1.0, 0.5),
        R(ValueError, r"mass_over_time.*t= or num_times="),
    ),
    # ---- wrap: the model and the constraints -----------------------------------------------
    Case(
        "wrap(lambda)", lambda: W(lambda x: x, D(0.0)), R(TypeError, r"wrap.*nn\.Module.*function")
    ),
    Case("wrap(None)", lambda: W(None, D(0.0)), R(TypeError, r"wrap.*nn\.Module.*NoneType")),
    Case(
        "wrap(model) no constraint",
        lambda: W(det()),
        R(ValueError, r"wrap.*at least one constraint.*none"),
    ),
    Case(
        "wrap(model, 'dirichlet')",
        lambda: W(det(), "dirichlet"),
        R(TypeError, r"wrap.*constraints.*got str"),
    ),
    Case(
        "wrap(model, [D])", lambda: W(det(), [D(0.0)]), R(TypeError, r"wrap.*constraints.*got list")
    ),
    Case(
        "wrap(model, D, 3.0)",
        lambda: W(det(), D(0.0), 3.0),
        R(TypeError, r"wrap.*constraints.*got float"),
    ),
    Case(
        "BoundaryCorrection(lambda)",
        lambda: cl.BoundaryCorrection(lambda x: x, [D(0.0)]),
        R(TypeError, r"BoundaryCorrection.*nn\.Module.*function"),
    ),
    Case(
        "BoundaryCorrection(conservation)",
        lambda: cl.BoundaryCorrection(det(), [I(0.0)]),
        R(TypeError, r"BoundaryCorrection.*boundary conditions.*IntegralConservation"),
    ),
    Case(
        "ConservationProjection(Dirichlet)",
        lambda: cl.ConservationProjection(det(), [D(0.0)]),
        R(TypeError, r"ConservationProjection.*conservation.*Dirichlet"),
    ),
    Case(
        "ConservationProjection([])",
        lambda: cl.ConservationProjection(det(), []),
        R(ValueError, r"ConservationProjection.*at least one.*none"),
    ),
    Case("unwrap(plain)", lambda: cl.unwrap(det()), R(TypeError, r"unwrap.*cl\.wrap.*Fn")),
    Case(
        "wrap(..., foo=1)",
        lambda: W(det(), D(0.0), foo=1),
        R(TypeError, r"unexpected keyword argument 'foo'"),
    ),
    # ---- wrap: options ------------------------------------------------------------------------
    Case(
        "lift=-1", lambda: W(det(), D(0.0), lift=-1), R(ValueError, r"lift.*non-negative int.*-1")
    ),
    Case("lift=1.5", lambda: W(det(), D(0.0), lift=1.5), R(TypeError, r"lift.*int.*1\.5")),
    Case("lift=True", lambda: W(det(), D(0.0), lift=True), R(TypeError, r"lift.*int.*True")),
    Case(
        "lift too big",
        lambda: W(det(), N(0.0), lift=6)(x1()),
        R(GridError, r"needs at least \d+ nodes.*lift=6.*got 9"),
    ),
    Case(
        "spacing=-1",
        lambda: W(det(), D(0.0), spacing=-1.0),
        R(GridError, r"spacing.*finite and positive.*-1"),
    ),
    Case(
        "spacing='a'", lambda: W(det(), N(0.0), spacing="a"), R(TypeError, r"spacing.*number.*str")
    ),
    Case(
        "spacing=nan", lambda: W(det(), N(0.0), spacing=NAN), R(GridError, r"spacing.*finite.*nan")
    ),
    Case(
        "spacing per axis mismatch",
        lambda: W(det(), N(0.0), spacing=[0.1, 0.1])(x1()),
        R(GridError, r"spacing.*one per spatial axis \(1\), got 2"),
    ),
    Case(
        "spacing and extent",
        lambda: W(det(), N(0.0), spacing=0.1, extent=1.0),
        R(ValueError, r"either spacing=.*or extent=.*not both"),
    ),
    Case("extent=0", lambda: W(det(), N(0.0), extent=0.0), R(GridError, r"extent.*positive.*0\.0")),
    Case(
        "extent=[1, -1]",
        lambda: W(det(), N(0.0, dim=0), extent=[1.0, -1.0]),
        R(GridError, r"extent.*positive"),
    ),
    Case(
        "mode='bogus'",
        lambda: W(det(), D(0.0), mode="bogus"),
        R(ValueError, r"mode.*one of.*'bogus'"),
    ),
    Case(
        "mode='refine' plain module",
        lambda: W(det(), D(0.0), mode="refine"),
        R(ValueError, r"mode='refine'.*adapter.*Fn.*mode='output'"),
    ),
    Case(
        "mode='refine' conservation only",
        lambda: W(det(), I(0.0), mode="refine"),
        R(ValueError, r"mode='refine'.*boundary conditions.*none"),
    ),
    Case("rcond=2", lambda: W(det(), D(0.0), rcond=2.0), R(ValueError, r"rcond.*\[0, 1\).*2\.0")),
    Case(
        "refresh=0", lambda: W(det(), D(0.0), refresh=0), R(ValueError, r"refresh.*positive int.*0")
    ),
    Case(
        "noise=-1", lambda: W(head(), I(0.0), noise=-1.0), R(ValueError, r"noise.*non-negative.*-1")
    ),
    Case(
        "noise=nan",
        lambda: W(head(), I(0.0), noise=NAN),
        R(ValueError, r"noise.*non-negative.*nan"),
    ),
    Case("noise='a'", lambda: W(head(), I(0.0), noise="a"), R(TypeError, r"noise.*number.*'a'")),
    Case(
        "noise per constraint count",
        lambda: W(head(), D(0.0), I(0.0), noise=[0.1]),
        R(ValueError, r"noise.*one value per constraint \(2\), got 1"),
    ),
    Case(
        "noise=[nan, 0]",
        lambda: W(head(), D(0.0), I(0.0), noise=[NAN, 0.0]),
        R(ValueError, r"noise.*>= 0.*nan"),
    ),
    Case(
        "noise tensor negative",
        lambda: W(head(), I(0.0), noise=torch.tensor(-1.0, dtype=F64))(x1()),
        R(ValueError, r"noise.*non-negative|noise.*>= 0"),
    ),
    Case(
        "noise tensor NaN",
        lambda: W(head(), I(0.0), noise=torch.tensor(NAN, dtype=F64))(x1()),
        R(ValueError, r"noise.*(NaN|finite|non-negative)"),
    ),
    Case(
        "metric='mahalanobis'",
        lambda: W(head(), I(0.0), metric="mahalanobis"),
        R(ValueError, r"metric.*one of.*mahalanobis"),
    ),
    Case(
        "grid_shape=(0,)",
        lambda: W(head(), I(0.0), grid_shape=(0,)),
        R(ValueError, r"grid_shape.*positive.*\(0,\)"),
    ),
    Case(
        "grid_shape='ab'",
        lambda: W(head(), I(0.0), grid_shape="ab"),
        R(TypeError, r"grid_shape.*ints.*'ab'"),
    ),
    Case(
        "grid_shape=5",
        lambda: W(head(), I(0.0), grid_shape=5),
        R(TypeError, r"grid_shape.*sequence.*5"),
    ),
    Case(
        "grid_shape mismatch",
        lambda: W(mvn_head(), I(0.0), grid_shape=(3, 4))(x1()),
        R(GridError, r"grid_shape=\(3, 4\) holds 12 points.*9"),
    ),
    Case(
        "normalizer=object()",
        lambda: W(det(), D(0.0), normalizer=object()),
        R(TypeError, r"normalizer.*transform.*object"),
    ),
    Case(
        "normalizer std=0",
        lambda: W(det(), D(1.0), normalizer=Norm(std=0.0))(x1()),
        R(ValueError, r"normali[sz]er.*(zero|scale)"),
    ),
    Case(
        "normalizer NaN",
        lambda: W(det(), I(1.0), normalizer=Norm(mean=NAN))(x1()),
        R(ValueError, r"normali[sz]er.*(NaN|finite)"),
    ),
    Case(
        "adapter='x'", lambda: W(det(), D(0.0), adapter="x"), R(TypeError, r"adapter.*Adapter.*str")
    ),
    Case(
        "endpoint=False high Dirichlet",
        lambda: W(det(), D(0.0), endpoint=False)(x1()),
        R(GridError, r"endpoint=False.*high end"),
    ),
    Case(
        "no adapter",
        lambda: cl.adapters.find(object()),
        R(NoAdapterError, r"no adapter.*object.*register"),
    ),
    Case(
        "register twice",
        _register_twice,
        R(ValueError, r"register.*already has the adapter.*replace=True"),
    ),
    Case(
        "register non-adapter",
        lambda: cl.adapters.register(nn.Linear)(int),
        R(TypeError, r"register.*subclass of.*Adapter.*int"),
    ),
    # ---- the model's output: kinds and shapes (generic adapter) --------------------------
    Case(
        "(batch,) output, Dirichlet",
        lambda: W(det(lambda x: x.sum((1, 2))), D(0.0))(x1()),
        R((TypeError, GridError), r"cl\.wrap.*\(batch, .*got shape \(2,\)"),
    ),
    Case(
        "(batch,) output, conservation",
        lambda: W(det(lambda x: x.sum((1, 2))), C(G6))(x1()),
        R((TypeError, GridError), r"cl\.wrap.*\(batch, .*got shape \(2,\)"),
    ),
    Case(
        "scalar output",
        lambda: W(det(lambda x: x.sum()), D(0.0))(x1()),
        R((TypeError, GridError), r"cl\.wrap.*\(batch, .*got shape \(\)"),
    ),
    Case(
        "(batch, n) output, Dirichlet",
        lambda: W(det(lambda x: x[:, 0]), D(2.0))(x1()),
        A(lambda y: faces(y, 2.0)),
    ),
    Case(
        "string output",
        lambda: W(det(lambda x: "u"), D(0.0))(x1()),
        R(TypeError, r"cl\.wrap.*(cannot read|expected).*str"),
    ),
    Case(
        "None output",
        lambda: W(det(lambda x: None), I(0.0))(x1()),
        R(TypeError, r"cl\.wrap.*(cannot read|expected).*NoneType"),
    ),
    Case(
        "int output",
        lambda: W(det(lambda x: x.long()), D(0.0))(x1()),
        R(TypeError, r"cl\.wrap.*floating-point.*int64"),
    ),
    Case(
        "3-tuple output",
        lambda: W(det(lambda x: (x, x, x)), I(0.0))(x1()),
        R(TypeError, r"cl\.wrap.*tuple.*\(mean, variance\).*3 items"),
    ),
    Case(
        "dict without mean",
        lambda: W(dict_head(u=torch.sin), D(0.0))(x1()),
        R(TypeError, r"cl\.wrap.*dict.*mean.*\['u'\]"),
    ),
    Case(
        "dict var and std",
        lambda: W(dict_head(mean=torch.sin, var=torch.cos, std=torch.cos), I(0.0))(x1()),
        R(TypeError, r"cl\.wrap.*both a variance.*standard deviation"),
    ),
    Case(
        "variance wrong shape",
        lambda: W(head(var=lambda x: torch.ones(3, dtype=x.dtype)), I(0.0))(x1()),
        R(ValueError, r"cl\.wrap.*variance.*\(3,\).*mean.*\(2, 1, 9\)"),
    ),
    Case(
        "variance int",
        lambda: W(head(var=lambda x: torch.ones_like(x).long()), I(0.0))(x1()),
        R(TypeError, r"cl\.wrap.*variance.*floating-point.*int64"),
    ),
    Case(
        "namedtuple output",
        lambda: W(det(lambda x: Pair(x, x)), I(0.0))(x1()),
        R(TypeError, r"cl\.wrap.*cannot read.*type Pair.*Supported"),
    ),
    Case(
        "2-tuple of tensor and str",
        lambda: W(det(lambda x: (x, "v")), I(0.0))(x1()),
        R(TypeError, r"cl\.wrap.*variance.*str"),
    ),
    Case(
        "dict mean only, Dirichlet",
        lambda: W(dict_head(mean=torch.sin), D(1.0))(x1())["mean"],
        A(lambda y: faces(y, 1.0)),
    ),
    Case(
        "dict extra entries pass",
        lambda: W(dict_head(mean=torch.sin, var=lambda x: 1 + x**2, extra=torch.cos), I(0.0))(x1()),
        A(lambda o: set(o) == {"mean", "var", "extra"} and total(o["mean"], 0.0)),
    ),
    # ---- the model's own NaN / inf: deterministic ------------------------------------------
    Case(
        "NaN output, Dirichlet",
        lambda: W(det(lambda x: x / 0 * 0), D(0.0))(x1()),
        R(ValueError, r"BoundaryCorrection.*model's output.*NaN.*expected finite"),
    ),
    Case(
        "inf output, Neumann",
        lambda: W(det(lambda x: x / 0), N(0.0))(x1()),
        R(ValueError, r"BoundaryCorrection.*model's output.*inf"),
    ),
    Case(
        "NaN output, Periodic",
        lambda: W(det(lambda x: torch.where(x > 0, NAN, x)), P())(x1()),
        R(ValueError, r"model's output.*NaN"),
    ),
    Case(
        "NaN output, conservation",
        lambda: W(det(lambda x: x / 0 * 0), I(0.0))(x1()),
        R(ValueError, r"ConservationProjection.*model's output.*NaN"),
    ),
    Case(
        "NaN output, joint",
        lambda: W(det(lambda x: x / 0 * 0), N(0.0), I(0.0))(x1()),
        R(ValueError, r"ConstraintLayer.*model's output.*NaN"),
    ),
    Case(
        "NaN interior only, Dirichlet",
        lambda: W(det(lambda x: torch.where(torch.arange(9) == 4, NAN, x)), D(0.0))(x1()),
        R(ValueError, r"model's output.*NaN"),
    ),
    Case(
        "NaN output, debug=True",
        lambda: W(det(lambda x: x / 0 * 0), D(0.0), debug=True)(x1()),
        R(ValueError, r"model's output.*NaN"),
    ),
    Case(
        "NaN output requires grad",
        lambda: W(
            nn.Sequential(nn.Conv1d(1, 1, 3, padding=1).double(), Fn(lambda x: x * NAN)), D(0.0)
        )(x1()),
        R(ValueError, r"model's output.*NaN"),
    ),
    # ---- the model's own NaN / inf: Gaussian ------------------------------------------------
    Case(
        "NaN mean, (mean, var), conservation",
        lambda: W(head(mean=lambda x: x * NAN), I(0.0))(x1()),
        R(ValueError, r"ConservationProjection.*output.*NaN"),
    ),
    Case(
        "NaN variance, conservation",
        lambda: W(head(var=lambda x: x * NAN), I(0.0))(x1()),
        R(ValueError, r"ConservationProjection.*variance.*NaN"),
    ),
    Case(
        "inf variance, conservation",
        lambda: W(head(var=lambda x: 1 / (x * 0)), I(0.0))(x1()),
        R(ValueError, r"ConservationProjection.*variance.*inf"),
    ),
    Case(
        "negative variance",
        lambda: W(head(var=lambda x: -1 - x**2), I(0.0))(x1()),
        R(ValueError, r"ConservationProjection.*variance.*negative.*expected.*>= 0"),
    ),
    Case(
        "inf variance, Dirichlet",
        lambda: W(head(var=lambda x: 1 / (x * 0)), D(0.0))(x1()),
        R(ValueError, r"BoundaryCorrection.*variance.*inf"),
    ),
    Case(
        "NaN variance, joint",
        lambda: W(head(var=lambda x: x * NAN), D(0.0), I(0.0))(x1()),
        R(ValueError, r"ConstraintLayer.*variance.*NaN"),
    ),
    Case(
        "NaN std in dict",
        lambda: W(dict_head(mean=torch.sin, std=lambda x: x * NAN), I(0.0))(x1()),
        R(ValueError, r"variance.*NaN"),
    ),
    Case(
        "Normal with inf scale",
        lambda: W(normal_head(scale=lambda x: 1 / (x * 0)), I(0.0))(x1()),
        R(ValueError, r"variance.*inf"),
    ),
    Case(
        "MVN with NaN covariance",
        lambda: W(mvn_head(cov_nan=True), I(0.0))(x1()),
        R(ValueError, r"covariance.*NaN"),
    ),
    Case(
        "GP with NaN targets",
        lambda: W(gp(nan_targets=True), I(0.0))(torch.linspace(0, 1, 9, dtype=F64)),
        R(ValueError, r"ConservationProjection.*output.*NaN"),
    ),
    Case(
        "Ensemble with a NaN member",
        lambda: W(_ensemble(torch.sin, lambda x: x * NAN), I(0.0))(x1()),
        R(ValueError, r"ConservationProjection.*NaN"),
    ),
    Case(
        "FNO on NaN input",
        lambda: W(fno(), D(0.0))(x1() * NAN),
        R(ValueError, r"BoundaryCorrection.*model's output.*NaN"),
    ),
    # ---- values evaluated per call: learnable, callables, Given ---------------------------
    Case(
        "learnable Dirichlet NaN",
        lambda: W(det(), _poisoned_param())(x1()),
        R(ValueError, r"BoundaryCorrection.*Dirichlet.*value.*NaN"),
    ),
    Case(
        "learnable Neumann NaN",
        lambda: W(det(), N(_param(NAN)))(x1()),
        R(ValueError, r"Neumann.*value.*NaN"),
    ),
    Case(
        "learnable total inf",
        lambda: W(head(), _poisoned_total())(x1()),
        R(ValueError, r"ConservationProjection.*right-hand side.*inf"),
    ),
    Case(
        "learnable Dirichlet NaN, joint",
        lambda: W(det(), _poisoned_param(), I(0.0))(x1()),
        R(ValueError, r"ConstraintLayer.*Dirichlet.*NaN"),
    ),
    Case("learnable value gradient", _grad_flows, A(bool)),
    Case(
        "callable value NaN",
        lambda: W(det(), D(lambda x: x[:, :, 0] * NAN))(x1()),
        R(ValueError, r"BoundaryCorrection.*value.*NaN"),
    ),
    Case(
        "callable value returns str",
        lambda: W(det(), D(lambda x: "v"))(x1()),
        R(TypeError, r"BoundaryCorrection.*callable.*number or a tensor.*str"),
    ),
    Case(
        "callable value wrong shape",
        lambda: W(det(), D(lambda x: torch.ones(5, dtype=x.dtype)))(x1()),
        R(GridError, r"value of shape \(5,\).*face shape \(2, 1\)"),
    ),
    Case(
        "callable total NaN",
        lambda: W(head(), I(lambda x: x[:, :, 0] * NAN))(x1()),
        R(ValueError, r"ConservationProjection.*right-hand side.*NaN"),
    ),
    Case(
        "callable value, functional, no inputs",
        lambda: cl.functional.enforce_boundary(x1(), [D(lambda x: x[:, :, 0])]),
        R(ValueError, r"enforce_boundary.*callable.*no input.*inputs="),
    ),
    Case(
        "callable value ok",
        lambda: W(det(), D(lambda x: x[:, :, 0]))(x1()),
        A(lambda y: bool((y[..., 0] == x1()[..., 0]).all() and (y[..., -1] == x1()[..., 0]).all())),
    ),
    Case(
        "value shape mismatch",
        lambda: W(det(), D(torch.ones(3, 1, dtype=F64)))(x1()),
        R(GridError, r"BoundaryCorrection.*value of shape \(3, 1\).*face shape \(2, 1\)"),
    ),
    Case(
        "value per sample ok",
        lambda: W(det(), D(torch.tensor([[1.0], [2.0]], dtype=F64)))(x1()),
        A(lambda y: y[:, 0, 0].tolist() == [1.0, 2.0] and y[:, 0, -1].tolist() == [1.0, 2.0]),
    ),
    Case(
        "int tensor value ok",
        lambda: W(det(), D(torch.tensor(2)))(x1()),
        A(lambda y: faces(y, 2.0)),
    ),
    Case(
        "Given missing",
        lambda: W(det(), D(cl.Given("wall")))(x1()),
        R(
            ValueError,
            r"BoundaryCorrection.*keyword argument.*\['wall'\].*passed none.*wall=\.\.\.",
        ),
    ),
    Case(
        "Given misspelt",
        lambda: W(KwNet(), D(cl.Given("wall")))(x1(), walls=torch.zeros(2, 1)),
        R(ValueError, r"keyword argument.*\['wall'\].*\['walls'\]"),
    ),
    Case(
        "Given extra keyword to a model without keywords",
        lambda: W(KwNet(), D(0.0))(x1(), wall=torch.zeros(2, 1)),
        R(TypeError, r"unexpected keyword argument 'wall'"),
    ),
    Case(
        "Given NaN",
        lambda: W(det(), D(cl.Given("g")))(x1(), g=torch.full((2, 1), NAN, dtype=F64)),
        R(ValueError, r"BoundaryCorrection.*Dirichlet.*NaN or inf.*expected finite"),
    ),
    Case(
        "Given float NaN",
        lambda: W(det(), D(cl.Given("g")))(x1(), g=NAN),
        R(ValueError, r"BoundaryCorrection.*finite.*nan"),
    ),
    Case(
        "Given str",
        lambda: W(det(), D(cl.Given("g")))(x1(), g="one"),
        R(TypeError, r"BoundaryCorrection.*number.*tensor.*str"),
    ),
    Case(
        "Given wrong shape",
        lambda: W(det(), D(cl.Given("g")))(x1(), g=torch.ones(3, dtype=F64)),
        R(GridError, r"value of shape \(3,\).*face shape \(2, 1\)"),
    ),
    Case(
        "Given total inf",
        lambda: W(head(), I(cl.Given("m")))(x1(), m=torch.full((2, 1), INF, dtype=F64)),
        R(ValueError, r"ConservationProjection.*(value|right-hand side).*inf"),
    ),
    Case(
        "Given total wrong shape",
        lambda: W(head(), I(cl.Given("m")))(x1(), m=torch.ones(3, dtype=F64)),
        R(GridError, r"total of shape \(3,\).*rows' shape \(2, 1\)"),
    ),
    Case(
        "Given b NaN, Conservation(G)",
        lambda: W(det(), C(G6, cl.Given("b")))(x1(), b=torch.tensor([NAN], dtype=F64)),
        R(ValueError, r"ConservationProjection.*NaN"),
    ),
    Case(
        "Given NaN requires grad",
        lambda: W(det(), D(cl.Given("g")))(
            x1(), g=torch.full((2, 1), NAN, dtype=F64, requires_grad=True)
        ),
        R(ValueError, r"NaN or inf"),
    ),
    Case(
        "Given value ok",
        lambda: W(det(), D(cl.Given("g")), I(cl.Given("m")))(
            x1(), g=torch.ones(2, 1, dtype=F64), m=torch.full((2, 1), 0.5, dtype=F64)
        ),
        A(lambda y: faces(y, 1.0) and total(y, 0.5)),
    ),
    Case(
        "residual without Given",
        lambda: W(det(), D(cl.Given("g"))).residual(x1()),
        R(ValueError, r"keyword argument.*\['g'\]"),
    ),
    Case("caller tensors not modified", _no_mutation, A(bool)),
    # ---- dtypes: overflow, float16, complex ---------------------------------------------------
    Case(
        "Dirichlet(1e39) float32",
        lambda: W(det(), D(1e39))(x1(dtype=F32)),
        R(ValueError, r"BoundaryCorrection.*1e\+39.*overflows.*float32"),
    ),
    Case("Dirichlet(1e39) float64", lambda: W(det(), D(1e39))(x1()), A(lambda y: faces(y, 1e39))),
    Case(
        "Dirichlet(tensor 1e39 f64) float32",
        lambda: W(det(), D(torch.tensor(1e39, dtype=F64)))(x1(dtype=F32)),
        R(ValueError, r"BoundaryCorrection.*Dirichlet.*value.*float32.*overflows"),
    ),
    Case(
        "Dirichlet(7e4) float16",
        lambda: W(det(), D(7e4))(x1(dtype=torch.float16)),
        R(ValueError, r"overflows.*float16"),
    ),
    Case(
        "Neumann order 3 at 3e4 float16",
        lambda: W(det(), N(3e4, order=3))(x1(n=33, dtype=torch.float16)),
        A(
            lambda y: bool(
                cl.metrics.boundary_error(y.double(), [N(3e4, order=3)]).max() < 5e-3 * 3e4
            )
        ),
    ),
    Case(
        "Neumann order 3 at 3e4 float16, extent 100",
        lambda: W(det(), N(3e4, order=3), extent=100.0)(x1(n=9, dtype=torch.float16)),
        R(ValueError, r"BoundaryCorrection.*overflow.*float16"),
    ),
    Case(
        "Neumann order 3 at 1 float16 ok",
        lambda: W(det(), N(1.0, order=3, side="high"))(x1(n=33, dtype=torch.float16)),
        A(
            lambda y: bool(
                cl.metrics.boundary_error(y.double(), [N(1.0, order=3, side="high")]).max() < 0.2
            )
        ),
    ),
    Case(
        "conservation total 1e39 float32",
        lambda: W(det(), I(1e39))(x1(dtype=F32)),
        R(ValueError, r"ConservationProjection.*overflow.*float32"),
    ),
    Case(
        "bfloat16 Dirichlet exact",
        lambda: W(det(), D(0.5))(x1(dtype=torch.bfloat16)),
        A(lambda y: faces(y, 0.5)),
    ),
    Case(
        "float16 conservation",
        lambda: W(det(), I(0.25))(x1(dtype=torch.float16)),
        A(lambda y: y.dtype == torch.float16 and total(y, 0.25, tol=5e-3)),
    ),
    Case(
        "complex output, real Dirichlet",
        lambda: W(det(lambda x: x * (1 + 1j)), D(2.0))(x1()),
        A(lambda y: y.is_complex() and faces(y, 2.0)),
    ),
    Case(
        "complex output, complex Dirichlet",
        lambda: W(det(lambda x: x * (1 + 1j)), D(torch.tensor(1 + 2j)))(x1()),
        A(lambda y: faces(y, torch.tensor(1 + 2j, dtype=torch.complex128))),
    ),
    Case(
        "complex output, complex Dirichlet complex64",
        lambda: W(det(lambda x: x * (1 + 1j)), D(torch.tensor(1 + 2j, dtype=torch.complex64)))(
            x1()
        ),
        A(lambda y: faces(y, torch.tensor(1 + 2j, dtype=torch.complex128))),
    ),
    Case(
        "complex output, complex Given",
        lambda: W(det(lambda x: x * (1 + 1j)), D(cl.Given("g")))(
            x1(), g=torch.tensor([[1j], [2 - 1j]])
        ),
        A(lambda y: y[:, 0, 0].tolist() == [1j, 2 - 1j] and y[:, 0, -1].tolist() == [1j, 2 - 1j]),
    ),
    Case(
        "complex output, complex Neumann",
        lambda: W(det(lambda x: x * (1 + 1j)), N(torch.tensor(1 - 1j), side="high"))(x1(n=33)),
        A(
            lambda y: bool(
                ((1.5 * y[..., -1] - 2 * y[..., -2] + 0.5 * y[..., -3]) * 32 - (1 - 1j)).abs().max()
                < 1e-9
            )
        ),
    ),
    Case(
        "complex value, real output",
        lambda: W(det(), D(torch.tensor(1 + 2j)))(x1()),
        R(TypeError, r"BoundaryCorrection.*value is complex.*output is real.*float64"),
    ),
    Case(
        "complex Given, real output",
        lambda: W(det(), D(cl.Given("g")))(x1(), g=torch.tensor(1j)),
        R(TypeError, r"value is complex.*output is real"),
    ),
    Case(
        "complex output, conservation",
        lambda: W(det(lambda x: x * (1 + 1j)), I(0.0))(x1()),
        R(TypeError, r"ConservationProjection.*complex.*(real|channels)"),
    ),
    Case(
        "complex output, joint",
        lambda: W(det(lambda x: x * (1 + 1j)), D(0.0), I(0.0))(x1()),
        R(TypeError, r"ConstraintLayer.*complex.*(real|channels)"),
    ),
    Case(
        "complex total",
        lambda: W(det(), I(torch.tensor(1j)))(x1()),
        R(TypeError, r"Conservation\.integral.*right-hand side must be real.*complex"),
    ),
    # ---- empty batches and degenerate grids ----------------------------------------------------
    Case("empty batch, Dirichlet", lambda: W(det(), D(1.0))(x1(batch=0)), A(shape_is(0, 1, 9))),
    Case("empty batch, Neumann", lambda: W(det(), N(1.0))(x1(batch=0)), A(shape_is(0, 1, 9))),
    Case("empty batch, conservation", lambda: W(det(), I(1.0))(x1(batch=0)), A(shape_is(0, 1, 9))),
    Case(
        "empty batch, Conservation(G)",
        lambda: W(det(), C(G6, 1.0))(x1(batch=0)),
        A(shape_is(0, 1, 9)),
    ),
    Case(
        "empty batch, Gaussian conservation",
        lambda: W(head(), I(1.0))(x1(batch=0)),
        A(lambda o: tuple(o[0].shape) == (0, 1, 9) and tuple(o[1].shape) == (0, 1, 9)),
    ),
    Case("empty batch, joint", lambda: W(det(), N(0.0), I(1.0))(x1(batch=0)), A(shape_is(0, 1, 9))),
    Case(
        "empty batch, joint Gaussian",
        lambda: W(head(), D(0.0), I(1.0))(x1(batch=0)),
        A(lambda o: tuple(o[0].shape) == (0, 1, 9)),
    ),
    Case(
        "empty batch, functional",
        lambda: cl.functional.enforce_boundary(x1(batch=0), [D(1.0)]),
        A(shape_is(0, 1, 9)),
    ),
    Case(
        "empty batch, functional conservation",
        lambda: cl.functional.enforce_conservation(x1(batch=0), I(1.0)).mean,
        A(shape_is(0, 1, 9)),
    ),
    Case(
        "zero-length grid",
        lambda: W(det(), D(0.0))(x1(n=0)),
        R(GridError, r"needs at least 2 nodes.*got 0"),
    ),
    Case(
        "one-node grid, Dirichlet",
        lambda: W(det(), D(0.0))(x1(n=1)),
        R(GridError, r"needs at least 2 nodes.*got 1"),
    ),
    Case(
        "Neumann order 3 on 3 nodes",
        lambda: W(det(), N(0.0, order=3))(x1(n=3)),
        R(GridError, r"Neumann.*needs at least 5 nodes.*got 3"),
    ),
    Case(
        "integral on 1 node",
        lambda: W(det(), I(0.0))(x1(n=1)),
        R(ValueError, r"(at least|nodes|points).*1"),
    ),
    # ---- geometry: axes, faces, channels ------------------------------------------------------
    Case(
        "no dim= on 2-D grid",
        lambda: W(det(), D(0.0))(x2()),
        R(GridError, r"BoundaryCorrection.*without dim=.*2 spatial axes.*dim=0"),
    ),
    Case(
        "no dim= on 2-D grid, joint",
        lambda: W(det(), N(0.0), I(0.0))(x2()),
        R(GridError, r"ConstraintLayer.*without dim=.*2 spatial axes"),
    ),
    Case(
        "no dim= on 2-D grid, Gaussian",
        lambda: W(head(), D(0.0), I(0.0))(x2()),
        R(GridError, r"without dim=.*2 spatial axes"),
    ),
    Case(
        "dim out of range",
        lambda: W(det(), D(0.0, dim=2))(x2()),
        R(GridError, r"dim=2 is out of range.*2 spatial"),
    ),
    Case(
        "integral dim out of range",
        lambda: W(det(), I(0.0, dim=1))(x1()),
        R(GridError, r"dim=1 is out of range"),
    ),
    Case("dim=-1 ok", lambda: W(det(), D(1.0, dim=-1))(x2()), A(lambda y: faces(y, 1.0, dim=-1))),
    Case(
        "duplicate faces Dirichlet",
        lambda: W(det(), D(0.0), D(1.0))(x1()),
        R(ConstraintError, r"Dirichlet.*Dirichlet.*both act on the low face.*one condition per"),
    ),
    Case(
        "duplicate face Dirichlet/Neumann",
        lambda: W(det(), D(0.0, side="high"), N(1.0))(x1()),
        R(ConstraintError, r"both act on the high face"),
    ),
    Case(
        "duplicate face Periodic/Dirichlet",
        lambda: W(det(), P(), D(0.0, side="low"))(x1()),
        R(ConstraintError, r"both act on the low face"),
    ),
    Case(
        "duplicate faces, joint Gaussian",
        lambda: W(head(), D(0.0), D(1.0), I(0.0))(x1()),
        R(ConstraintError, r"both act on the low face"),
    ),
    Case(
        "same face, other channels ok",
        lambda: W(det(lambda x: x.expand(-1, 2, -1)), D(0.0, channels=0), D(1.0, channels=1))(x1()),
        A(lambda y: faces(y[:, 0], 0.0) and faces(y[:, 1], 1.0)),
    ),
    Case(
        "channels out of range",
        lambda: W(det(), D(0.0, channels=3))(x1()),
        R(GridError, r"channels=\[3\] out of range.*1 channel"),
    ),
    Case(
        "integral channels out of range",
        lambda: W(det(), I(0.0, channels=2))(x1()),
        R(GridError, r"channels \[2\] out of range.*1 channel"),
    ),
    Case(
        "Periodic endpoint=False",
        lambda: W(det(), P(), endpoint=False)(x1()),
        R(GridError, r"endpoint=False"),
    ),
    Case(
        "two axes ok",
        lambda: W(det(), D(0.0, dim=0), N(0.0, dim=1))(x2()),
        A(lambda y: faces(y[..., 1:-1], 0.0, dim=2)),
    ),
    # ---- conservation rows: shapes --------------------------------------------------------------
    Case(
        "G columns mismatch",
        lambda: W(det(), C(torch.ones(1, 5, dtype=F64)))(x1()),
        R(ValueError, r"ConservationProjection.*5 columns.*9 values"),
    ),
    Case(
        "b wrong shape",
        lambda: W(det(), C(G6, torch.ones(3, dtype=F64)))(x1()),
        R(ValueError, r"ConservationProjection.*b of shape \(3,\).*expected a number or shape"),
    ),
    Case(
        "per-sample G batch mismatch",
        lambda: W(det(), C(torch.ones(3, 1, 9, dtype=F64)))(x1()),
        R(ValueError, r"ConservationProjection.*G per sample for 3 samples.*batch 2"),
    ),
    Case(
        "total wrong shape",
        lambda: W(det(), I(torch.ones(4, dtype=F64)))(x1()),
        R(GridError, r"ConservationProjection.*total of shape \(4,\).*\(2, 1\)"),
    ),
    Case(
        "integral grid wrong size",
        lambda: W(det(), I(0.0, grid=torch.linspace(0, 1, 5)))(x1()),
        R(GridError, r"ConservationProjection.*grid.*5 nodes.*9"),
    ),
    Case(
        "integral per frame ok",
        lambda: W(det(), I(torch.arange(5.0, dtype=F64)))(x2()),
        A(lambda y: conserved(y, I(torch.arange(5.0, dtype=F64)))),
    ),
    Case(
        "flat (batch, n) integral ok",
        lambda: W(det(lambda x: x[:, 0]), I(1.0))(x1()),
        A(lambda y: total(y, 1.0)),
    ),
    Case(
        "zero-variance row",
        lambda: W(head(var=lambda x: torch.zeros_like(x)), I(1.0))(x1()),
        R(SingularConstraintError, r"zero variance.*noise.*euclidean"),
    ),
    Case(
        "zero-variance row, euclidean ok",
        lambda: W(head(var=lambda x: torch.zeros_like(x)), I(1.0), metric="euclidean")(x1()),
        A(lambda o: total(o[0], 1.0)),
    ),
    # ---- joint: incompatible and redundant rows ------------------------------------------------
    Case(
        "incompatible: total on the walls",
        lambda: W(det(), D(0.0), C(torch.eye(9, dtype=F64)[:1], 1.0))(x1()),
        R(
            IncompatibleConstraintsError,
            r"ConstraintLayer.*cannot hold together.*Conservation.*row 0",
        ),
    ),
    Case(
        "incompatible: total on the walls, Gaussian",
        lambda: W(head(), D(0.0), C(torch.eye(9, dtype=F64)[:1], 1.0))(x1()),
        R(IncompatibleConstraintsError, r"ConstraintLayer.*cannot hold together"),
    ),
    Case(
        "incompatible: total on a 2-node grid",
        lambda: W(det(), D(0.0), I(1.0))(x1(n=2)),
        R(IncompatibleConstraintsError, r"cannot hold together.*integral"),
    ),
    Case(
        "incompatible: two totals",
        lambda: W(det(), I(0.0), I(1.0))(x1()),
        R(
            SingularConstraintError,
            r"ConservationProjection.*(cannot hold together|dependent|conflict)",
        ),
    ),
    Case(
        "incompatible: two totals, Gaussian",
        lambda: W(head(), I(0.0), I(1.0))(x1()),
        R(
            SingularConstraintError,
            r"ConservationProjection.*(cannot hold together|dependent|conflict)",
        ),
    ),
    Case(
        "incompatible: two totals, joint",
        lambda: W(det(), N(0.0), I(0.0), I(1.0))(x1()),
        R(IncompatibleConstraintsError, r"cannot hold together"),
    ),
    Case(
        "redundant: total on the walls agrees",
        lambda: W(det(), D(0.0), C(torch.eye(9, dtype=F64)[:1], 0.0))(x1()),
        A(lambda y: faces(y, 0.0)),
    ),
    Case(
        "redundant: agreeing Gaussian",
        lambda: W(head(), D(1.0), C(torch.eye(9, dtype=F64)[-1:], 1.0))(x1()),
        A(lambda o: gaussian_faces(o, 1.0)),
    ),
    Case(
        "redundant: the same total twice",
        lambda: W(det(), I(0.5), I(0.5))(x1()),
        A(lambda y: total(y, 0.5)),
    ),
    Case(
        "redundant: same total twice, Gaussian",
        lambda: W(head(), I(0.5), I(0.5))(x1()),
        A(lambda o: total(o[0], 0.5)),
    ),
    Case(
        "redundant: joint same total twice",
        lambda: W(det(), N(0.0), I(0.5), I(0.5))(x1()),
        A(lambda y: total(y, 0.5)),
    ),
    # ---- joint and Gaussian: correct acceptance ------------------------------------------------
    Case(
        "joint Neumann + total",
        lambda: W(det(), N(0.0), I(1.0))(x1(n=33)),
        A(lambda y: total(y, 1.0) and bool(cl.metrics.boundary_error(y, [N(0.0)]).max() < 1e-9)),
    ),
    Case(
        "joint Dirichlet + total, Gaussian",
        lambda: W(head(), D(0.0), I(1.0))(x1()),
        A(lambda o: gaussian_faces(o) and total(o[0], 1.0)),
    ),
    Case(
        "joint, MVN head",
        lambda: W(mvn_head(), D(0.0), I(1.0))(x1()),
        A(lambda d: near_faces(d.mean, 0.0) and total(d.mean, 1.0)),
    ),
    Case(
        "joint, Normal head",
        lambda: W(normal_head(), D(1.0), I(1.0))(x1()),
        A(lambda d: near_faces(d.loc, 1.0) and total(d.loc, 1.0)),
    ),
    Case(
        "joint, per-constraint noise",
        lambda: W(head(), D(0.0), I(1.0), noise=[0.0, 0.1])(x1()),
        A(lambda o: gaussian_faces(o)),
    ),
    Case(
        "joint, debug=True",
        lambda: W(det(), D(0.0), I(1.0), debug=True)(x1()),
        A(lambda y: faces(y, 0.0) and total(y, 1.0)),
    ),
    Case(
        "joint, normalizer",
        lambda: W(det(), D(1.0), I(2.0), normalizer=Norm())(x1()),
        A(
            lambda y: (
                faces(Norm().inverse_transform(y), 1.0) and total(Norm().inverse_transform(y), 2.0)
            )
        ),
    ),
    Case(
        "Gaussian Dirichlet: variance 0 at the walls",
        lambda: W(head(), D(0.5))(x1()),
        A(lambda o: gaussian_faces(o, 0.5)),
    ),
    Case(
        "ensemble, Dirichlet",
        lambda: W(_ensemble(torch.sin, torch.cos), D(0.0))(x1()),
        A(lambda o: gaussian_faces(o)),
    ),
    Case(
        "ensemble, joint",
        lambda: W(_ensemble(torch.sin, torch.cos), D(0.0), I(1.0))(x1()),
        A(lambda o: gaussian_faces(o) and total(o[0], 1.0)),
    ),
    Case(
        "GP, conservation",
        lambda: W(gp(), I(0.0))(torch.linspace(0, 1, 9, dtype=F64)),
        A(lambda d: total(d.mean.reshape(1, 1, -1), 0.0)),
    ),
    Case(
        "GP, Dirichlet",
        lambda: W(gp(), D(0.0))(torch.linspace(0, 1, 9, dtype=F64)),
        A(lambda d: near_faces(d.mean, 0.0)),
    ),
    Case(
        "GP, grid_shape mismatch",
        lambda: W(gp(), I(0.0), grid_shape=(2, 5))(torch.linspace(0, 1, 9, dtype=F64)),
        R(GridError, r"grid_shape=\(2, 5\) holds 10 points.*9"),
    ),
    Case(
        "GP, posterior with boundary",
        lambda: W(gp(), D(0.0)).posterior(torch.linspace(0, 1, 9, dtype=F64)),
        R(NotImplementedError, r"posterior.*boundary conditions"),
    ),
    Case(
        "FNO, no dim= on 2-D",
        lambda: W(fno(n_modes=(3, 3)), D(0.0))(torch.randn(1, 1, 8, 8, dtype=F64)),
        R(GridError, r"without dim=.*2 spatial axes"),
    ),
    Case(
        "FNO refine, conservation only",
        lambda: W(fno(), I(0.0), mode="refine"),
        R(ValueError, r"mode='refine'.*boundary conditions.*none"),
    ),
    Case(
        "FNO, joint ok",
        lambda: W(fno(), D(0.0), I(0.0))(x1(n=16)),
        A(lambda y: faces(y, 0.0) and total(y, 0.0)),
    ),
    # ---- functional API -----------------------------------------------------------------------
    Case(
        "enforce_boundary(list)",
        lambda: cl.functional.enforce_boundary([1.0, 2.0], [D(0.0)]),
        R(TypeError, r"enforce_boundary.*torch\.Tensor.*list"),
    ),
    Case(
        "enforce_boundary(2-D)",
        lambda: cl.functional.enforce_boundary(torch.ones(2, 9), [D(0.0)]),
        R(GridError, r"enforce_boundary.*\(batch, channels, d1.*got shape \(2, 9\)"),
    ),
    Case(
        "enforce_boundary(int)",
        lambda: cl.functional.enforce_boundary(torch.ones(2, 1, 9, dtype=torch.int64), [D(0.0)]),
        R(TypeError, r"enforce_boundary.*floating-point.*int64"),
    ),
    Case(
        "enforce_boundary('bc')",
        lambda: cl.functional.enforce_boundary(x1(), "dirichlet"),
        R(TypeError, r"enforce_boundary.*boundary condition.*str"),
    ),
    Case(
        "enforce_boundary(NaN)",
        lambda: cl.functional.enforce_boundary(x1() * NAN, [D(0.0)]),
        R(ValueError, r"enforce_boundary.*NaN"),
    ),
    Case(
        "enforce_boundary(Given)",
        lambda: cl.functional.enforce_boundary(x1(), [D(cl.Given("g"))]),
        R(ValueError, r"enforce_boundary.*Given\('g'\).*value itself"),
    ),
    Case(
        "enforce_conservation(list)",
        lambda: cl.functional.enforce_conservation([1.0], I(0.0)),
        R(TypeError, r"enforce_conservation.*mean.*tensor.*list"),
    ),
    Case(
        "enforce_conservation(NaN)",
        lambda: cl.functional.enforce_conservation(x1() * NAN, I(0.0)),
        R(ValueError, r"enforce_conservation.*(NaN|finite)"),
    ),
    Case(
        "enforce_conservation metric",
        lambda: cl.functional.enforce_conservation(x1(), I(0.0), metric="l1"),
        R(ValueError, r"enforce_conservation.*metric.*'l1'"),
    ),
    Case(
        "enforce_conservation(Dirichlet)",
        lambda: cl.functional.enforce_conservation(x1(), D(0.0)),
        R(TypeError, r"enforce_conservation.*cl\.Conservation.*Dirichlet"),
    ),
    Case(
        "enforce_conservation variance shape",
        lambda: cl.functional.enforce_conservation(x1(), I(0.0), variance=torch.ones(4, dtype=F64)),
        R(ValueError, r"enforce_conservation.*variance of shape \(4,\).*\(2, 1, 9\)"),
    ),
    Case(
        "condition_gaussian G NaN",
        lambda: cl.functional.condition_gaussian(
            torch.zeros(2, 9, dtype=F64), torch.full((1, 9), NAN, dtype=F64), 0.0
        ),
        R(ValueError, r"condition_gaussian.*G.*(NaN|finite)"),
    ),
    Case(
        "condition_gaussian b NaN",
        lambda: cl.functional.condition_gaussian(
            torch.zeros(2, 9, dtype=F64), G6, torch.tensor([NAN], dtype=F64)
        ),
        R(ValueError, r"condition_gaussian.*b.*(NaN|finite)"),
    ),
    Case(
        "condition_gaussian variance inf",
        lambda: cl.functional.condition_gaussian(
            torch.zeros(2, 9, dtype=F64), G6, 0.0, variance=torch.full((2, 9), INF, dtype=F64)
        ),
        R(ValueError, r"condition_gaussian.*variance.*(inf|finite)"),
    ),
    Case(
        "condition_gaussian complex mean",
        lambda: cl.functional.condition_gaussian(
            torch.zeros(2, 9, dtype=torch.complex128), G6, 0.0
        ),
        R(TypeError, r"condition_gaussian.*floating-point.*complex128"),
    ),
    Case(
        "metrics.boundary_error(list)",
        lambda: cl.metrics.boundary_error([1.0], [D(0.0)]),
        R(TypeError, r"boundary_error.*Tensor.*list"),
    ),
    Case(
        "metrics.conservation_error bad shape",
        lambda: cl.metrics.conservation_error(torch.ones(2, 5, dtype=F64), C(G6)),
        R(ValueError, r"9 columns.*5 values"),
    ),
    # ---- issue 19: checkpoint files and messages ------------------------------------------------
    Case(
        "sidecar pickle with a payload",
        _in_tmp(_payload_sidecar),
        R(
            CheckpointError,
            r"from_checkpoint: m_constraint_layers\.pt is a pickled sidecar.*"
            r"trust_pickled_sidecar=True",
        ),
    ),
    Case(
        "sidecar copied from another checkpoint",
        _in_tmp(_copied_sidecar),
        R(
            CheckpointError,
            r"model_constraint_layers\.json does not belong to "
            r"model_state_dict\.pt.*Save the wrapper again",
        ),
    ),
    Case(
        "sidecar empty",
        _in_tmp(_empty_sidecar),
        R(
            CheckpointError,
            r"from_checkpoint: m_constraint_layers\.json is not a "
            r"constraint-layers sidecar",
        ),
    ),
    Case(
        "refine checkpoint into plain FNO.from_checkpoint",
        _in_tmp(_refine_as_plain),
        R(RuntimeError, r"Unexpected key.*trained_with_constraint_layers_refine"),
    ),
    Case(
        "Trainer with out_normalizer, no normalizer=",
        _trainer_without_normalizer,
        R(
            ValueError,
            r"BoundaryCorrection: called by neuraloperator's Trainer.*"
            r"normalizer=data_processor",
        ),
    ),
    Case(
        "noise=[0.5, 0.0] on a Dirichlet wall",
        lambda: W(head(), D(0.0), I(0.3), noise=[0.5, 0.0]),
        R(
            ValueError,
            r"ConstraintLayer: noise=\[0\.5, 0\.0\].*Dirichlet.*conservation rows "
            r"only.*noise=\[0\.0, 0\.0\]",
        ),
    ),
    Case(
        "infeasible bounds: total below the lower bound",
        lambda: W(det(), I(-1.0), cl.Bounds(lower=0.0))(x1()),
        R(
            IncompatibleConstraintsError,
            r"ConstraintLayer: the bounds.*cannot hold together.*"
            r"requested total -1",
        ),
    ),
    Case(
        "infeasible bounds: wall value above the upper bound",
        lambda: W(det(), D(2.0), cl.Bounds(upper=1.0))(x1()),
        R(
            IncompatibleConstraintsError,
            r"ConstraintLayer: the boundary conditions.*value 2.*"
            r"outside the bounds",
        ),
    ),
    Case(
        "infeasible bounds: Gaussian head, wall above the upper bound",
        lambda: W(head(), D(2.0), cl.Bounds(upper=1.0))(x1()),
        R(
            IncompatibleConstraintsError,
            r"ConstraintLayer: the bounds.*cannot hold together.*sample \(0,\): no value",
        ),
    ),
    Case(
        "Given value of a wrong shape keeps its name",
        lambda: W(det(), D(cl.Given("g")))(x1(), g=torch.zeros(3, 4, dtype=F64)),
        R(
            GridError,
            r"Dirichlet\(Given\('g'\).*\(3, 4\).*shape \(batch, 1\) for one value "
            r"per sample",
        ),
    ),
    Case(
        "Given total of a wrong shape keeps its name",
        lambda: W(det(), I(cl.Given("m")))(x1(), m=torch.zeros(3, 4, dtype=F64)),
        R(
            GridError,
            r"Conservation\.integral\(Given\('m'\).*shape \(batch, 1\) for one "
            r"value per sample",
        ),
    ),
    Case(
        "value shape hint on a 2D grid",
        lambda: W(det(), D(torch.zeros(3, 4, dtype=F64), dim=0))(x2()),
        R(
            GridError,
            r"face shape \(2, 1, 5\).*shape \(5,\).*\(batch, 1, 1\) for one value "
            r"per sample",
        ),
    ),
    Case(
        "meta tensor input",
        lambda: W(nn.Identity(), D(0.0))(torch.zeros(2, 1, 9, device="meta")),
        R(ValueError, r"BoundaryCorrection: the model's output is a meta tensor.*real device"),
    ),
    Case(
        "(x, aux) tuple read as (mean, variance)",
        lambda: W(_Aux(), D(0.0))(x1()),
        R(
            ValueError,
            r"BoundaryCorrection: .*variance holds negative.*2-tuple.*read as \(mean, "
            r"variance\).*\(x, aux\).*'mean': x, 'aux': aux",
        ),
    ),
    Case(
        "(x, aux) declared as a dict",
        lambda: W(Fn(lambda x: {"mean": x, "aux": x - 5.0}), D(0.0))(x1())["mean"],
        A(lambda y: faces(y, 0.0)),
    ),
    Case(
        "channel-last input, refine",
        lambda: W(_fno2d(), D(0.0, dim=0), mode="refine")(torch.randn(2, 8, 8, 1)),
        R(
            ValueError,
            r"BoundaryCorrection\(mode='refine'\): the input has shape \(2, 8, 8, 1\)"
            r".*channel-first.*movedim\(-1, 1\)",
        ),
    ),
    Case(
        "wrapper.n_modes = ...",
        _set_model_attribute,
        R(
            AttributeError,
            r"BoundaryCorrection: 'n_modes' is an attribute of the wrapped model "
            r"\(FNO\).*wrapped\.model\.n_modes = ",
        ),
    ),
    Case(
        "wrapper.debug = True, wrapper.model.n_modes = ...",
        _set_own_attributes,
        A(lambda w: w.debug and w.note == "mine" and tuple(w.model.n_modes) == (2, 2)),
    ),
    Case(
        "refine on an odd size off the last axis",
        lambda: W(_fno2d(), D(0.0, dim=0), mode="refine")(torch.randn(1, 1, 85, 16)),
        R(GridError, r"not shift invariant.*axis 0: 8\d or 8\d instead of 8\d.*mode='output'"),
    ),
    # ---- training harnesses (issue 19) --------------------------------------------------------
    Case(
        "inference_mode then train: output",
        lambda: _inference_then_train(D(0.0)),
        A(lambda y: faces(y, 0.0)),
    ),
    Case(
        "inference_mode then train: Neumann",
        lambda: _inference_then_train(N(1.0)),
        A(shape_is(2, 1, 16)),
    ),
    Case(
        "inference_mode then train: refine",
        lambda: _inference_then_train(D(0.0), mode="refine"),
        A(lambda y: faces(y, 0.0)),
    ),
    Case(
        "inference_mode then train: walls + total",
        lambda: _inference_then_train(D(0.0), I(1.0)),
        A(lambda y: faces(y, 0.0) and total(y, 1.0, 1e-5)),
    ),
    Case("refine under bfloat16 autocast", _refine_bf16, A(lambda y: faces(y, 0.5))),
    Case(
        "compiled FNO wrapped, refine",
        _compiled_refine_adapter,
        A(lambda r: r == ("neuraloperator", 1)),
    ),
    Case(
        "compiled FNO save_checkpoint",
        _compiled_save_checkpoint,
        A(lambda sd: all(not k.startswith("_orig_mod") for k in sd)),
    ),
    Case(
        "refine .to(float64)",
        lambda: _cast(lambda m: m.to(F64)),
        R(TypeError, r"BoundaryCorrection\.to\(torch\.float64\).*imaginary parts.*\.double\(\)"),
    ),
    Case(
        "output .to(float32) of an FNO",
        lambda: _cast(lambda m: m.to(F32), "output"),
        R(TypeError, r"BoundaryCorrection\.to\(torch\.float32\).*imaginary parts"),
    ),
    Case(
        "refine .double()",
        lambda: _cast(lambda m: m.double())(torch.randn(2, 1, 16, dtype=F64)),
        A(lambda y: faces(y, 0.0)),
    ),
    Case(
        "refine weights made real behind the wrapper",
        _made_real_behind,
        R(TypeError, r"mode='refine'.*spectral weights.*real.*imaginary"),
    ),
    Case(
        "jit.trace output mode",
        lambda: _trace(N(1.0)),
        R(
            NotImplementedError,
            r"BoundaryCorrection.*torch\.jit\.trace.*resolution.*torch\.compile",
        ),
    ),
    Case(
        "jit.trace conservation",
        lambda: _trace(I(1.0)),
        R(NotImplementedError, r"ConservationProjection.*torch\.jit\.trace"),
    ),
    # ---- torch.compile --------------------------------------------------------------------------
    Case(
        "torch.compile Given NaN",
        _compiled_given_nan,
        R(ValueError, r"BoundaryCorrection.*NaN or inf"),
    ),
    Case("torch.compile Given ok", _compiled_ok, A(lambda y: faces(y, 1.0)), slow=True),
]


# ------------------------------------------------------------------------------------- tests
def _param_case(case: Case):
    marks = [pytest.mark.slow] if case.slow else []
    return pytest.param(case, id=case.name, marks=marks)


def test_case_names_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert len(CASES) >= 150


@pytest.mark.parametrize("case", [_param_case(c) for c in CASES])
def test_reliability(case: Case):
    kind, detail = outcome(case)
    expected = "clear error" if isinstance(case.expect, Raises) else "accepted correctly"
    assert kind == expected, f"{case.name}: {kind}: {detail}"


def test_debug_check_flags_nan_residual():
    """The debug check fails on a NaN residual (a comparison that NaN passes would not)."""
    model = cl.wrap(det(), cl.Dirichlet(0.0), debug=True)
    y = x1()
    y[0, 0, 0] = NAN
    with pytest.raises(ConstraintViolationError, match="relative residual nan"):
        model._check(cl.functional.Gaussian(y, event_ndim=2), None, model.constraints)
