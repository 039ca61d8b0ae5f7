"""The refinement package's layout (issue 18): the names others import from
``constraint_layers.boundary.refine``, and the methods of ``Refinement`` that the hooks call
through the object (the boundary-paper studies patch them: ``refine_wiggles.py`` switches T2 or
T1 off by replacing ``Refinement._update`` / ``Refinement.__call__``)."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import constraint_layers as cl
from constraint_layers.boundary import refine
from constraint_layers.boundary.refine import algebra, hooks, state

F64 = torch.float64
PACKAGE = Path(refine.__file__).parent


def test_re_exports_are_the_modules_objects():
    assert refine.Refinement is state.Refinement
    assert refine.RefinementContext is state.RefinementContext
    assert refine.KERNEL_GRADS == ("exact", "detached")
    assert refine._FusedForward is hooks._FusedForward
    assert refine._index is algebra._index  # one cache: clearing it through the package works


def test_module_docstrings_state_no_measured_numbers():
    """Measured results live in RESULTS.md files, not in the modules' docstrings."""
    for f in sorted(PACKAGE.glob("*.py")):
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        assert doc, f"{f.name}: no module docstring"
        for word in doc.replace("(", " ").replace(")", " ").replace(",", " ").split():
            w = word.strip(".:;`'\"")
            assert not (any(c.isdigit() for c in w) and ("." in w or "x" == w[-1:])), (f.name, w)


class _Probed(torch.nn.Module):
    """A circular convolution without a description: the two-hook path (T2 on the input)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 2, 5, padding=2, padding_mode="circular", dtype=F64)

    def forward(self, x):
        return self.conv(x)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lift = torch.nn.Conv1d(1, 2, 1, dtype=F64)
        self.layer = _Probed()
        self.proj = torch.nn.Conv1d(2, 1, 1, dtype=F64)

    def forward(self, x):
        return self.proj(torch.tanh(self.layer(self.lift(x))))


class _Adapter(cl.adapters.Adapter):
    """Asks for the refinement of the net's one layer."""

    name = "test-refine-package"
    supports_refinement = True

    def attach(self, wrapper):
        if wrapper.mode == "refine":
            wrapper.add_refinement(wrapper.model.layer)


def test_the_hooks_call_the_patchable_methods(monkeypatch):
    torch.manual_seed(0)
    net = _Net()
    model = cl.BoundaryCorrection(net, [cl.Dirichlet(0.0)], mode="refine", adapter=_Adapter())
    x = torch.randn(2, 1, 16, dtype=F64)
    calls = {"update": 0, "rows": 0}
    update, rows = state.Refinement._update, state.Refinement.__call__

    def counted_update(self, *a, **k):
        calls["update"] += 1
        return update(self, *a, **k)

    def counted_rows(self, *a, **k):
        calls["rows"] += 1
        return rows(self, *a, **k)

    monkeypatch.setattr(state.Refinement, "_update", counted_update)
    monkeypatch.setattr(state.Refinement, "__call__", counted_rows)
    with torch.no_grad():
        y = model(x)
    assert calls == {"update": 1, "rows": 1}
    assert torch.isfinite(y).all() and float(y[..., 0].abs().max()) == 0.0
