"""``torch.jit.trace`` (issue 19, item 5): refused in every mode, with a message naming the fix.

A trace records the constraint step's index tensors, spacing and quadrature weights as constants
of the traced resolution; at another resolution the traced module used to return output that
violated the constraint (a Neumann residual of 29 to 39). ``torch.compile`` is exact at every
resolution (``tests/harness/test_compile.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import constraint_layers as cl

pytest.importorskip("neuralop")

from _models import fno

D, N = cl.Dirichlet, cl.Neumann
TOTAL = cl.Conservation.integral

CASES = {
    "output Neumann": ([N(1.0)], {}, "BoundaryCorrection"),
    "output Dirichlet": ([D(0.5)], {}, "BoundaryCorrection"),
    "refine": ([D(0.0)], {"mode": "refine"}, "BoundaryCorrection"),
    "conservation": ([TOTAL(1.0)], {}, "ConservationProjection"),
    "joint": ([D(0.0), TOTAL(1.0)], {}, "ConstraintLayer"),
    "bounds": ([cl.Bounds(lower=0.0)], {}, "ConstraintLayer"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("check_trace", [True, False])
def test_trace_refused(name, check_trace):
    constraints, options, call = CASES[name]
    torch.manual_seed(0)
    wrapped = cl.wrap(fno((6,), hidden=4, n_layers=1), *constraints, **options)
    with pytest.raises(NotImplementedError, match=rf"{call}.*torch\.jit\.trace.*torch\.compile"):
        torch.jit.trace(wrapped, torch.randn(2, 1, 32), check_trace=check_trace)
    # the wrapper is unharmed: it still runs, exactly, at any resolution
    y = wrapped(torch.randn(2, 1, 48))
    assert y.shape == (2, 1, 48)


def test_functional_trace_refused():
    bcs = [N(1.0)]
    with pytest.raises(NotImplementedError, match=r"enforce_boundary.*torch\.jit\.trace"):
        torch.jit.trace(lambda y: cl.functional.enforce_boundary(y, bcs), torch.randn(2, 1, 16))


def test_generic_model_trace_refused():
    wrapped = cl.wrap(nn.Conv1d(1, 1, 3, padding=1), N(0.0))
    with pytest.raises(NotImplementedError, match=r"cannot be traced"):
        torch.jit.trace(wrapped, torch.randn(2, 1, 16), check_trace=False)
