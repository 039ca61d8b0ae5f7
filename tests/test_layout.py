"""The package's layout: no import cycles, the core free of model libraries (module-level and
function-level imports alike), the adapters loading model libraries only when used, functional
free of layers, and the engine in one package (``constraint_layers/_engine/``) that the rest of the
package reaches through its entry modules only."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "constraint_layers"
ADAPTERS = REPO / "adapters"  # installed as constraint_layers.adapters
MODEL_LIBRARIES = {"neuralop", "gpytorch", "linear_operator"}

#: The engine's modules (relative to constraint_layers/_engine/).
ENGINE = {
    "__init__.py",
    "dispatch.py",
    "tags.py",
    "rowops.py",
    "faces.py",
    "dense.py",
    "streaming.py",
    "gaussian.py",
    "dependence.py",
    "reference.py",
    "bounded/__init__.py",
    "bounded/joint.py",
    "bounded/general.py",
    "bounded/separable.py",
    "bounded/faces.py",
    "bounded/checks.py",
}
#: The engine modules the rest of the package may import (public names only): the dispatcher,
#: the tags and row operations, the solvers that are public functions as well
#: (``enforce_boundary``, ``enforce_conservation``, ``condition_gaussian``) and the reference.
#: The other solvers (dense, dependence, bounded) are the dispatcher's to call.
ENGINE_ENTRIES = {"dispatch", "tags", "rowops", "faces", "streaming", "gaussian", "reference"}
#: Old module paths kept as re-export shims (other code and users import them).
SHIMS = {
    "constraint_layers._project",
    "constraint_layers._bounded",
    "constraint_layers._bounded.general",
    "constraint_layers.boundary.enforce",
    "constraint_layers.conservation.conserve",
    "constraint_layers.conservation.enforce",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT, ()), (ADAPTERS, ("constraint_layers", "adapters"))):
        for f in base.rglob("*.py"):
            rel = f.relative_to(ROOT.parent if not prefix else base).with_suffix("").parts
            name = ".".join((*prefix, *rel))
            mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(name: str, f: Path, *, walk: bool) -> list[tuple[str, list[str], str]]:
    """``(target module, imported names, package of the names)`` of every import (module level,
    or everywhere); the target is empty for ``from . import x``."""
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(f.read_text())
    out = []
    for node in ast.walk(tree) if walk else tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import x`` loads the submodule x; the package is loading already
            out.append((target if node.module else "", [a.name for a in node.names], target))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], a.name) for a in node.names)
    return out


def _graph(*, walk: bool = False) -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        deps: set[str] = set()
        for target, names, base in _imports(name, f, walk=walk):
            if target in mods:
                deps.add(target)
            deps.update(f"{base}.{a}" for a in names if f"{base}.{a}" in mods)
        graph[name] = deps - {name}
    return graph


def _external(name: str, f: Path, *, walk: bool) -> set[str]:
    """Top-level names of the third-party packages a module imports."""
    return {t.split(".")[0] for t, _, _ in _imports(name, f, walk=walk) if t}


def _closure(graph: dict[str, set[str]], start: str, *, parents: bool = True) -> set[str]:
    """The modules that importing ``start`` loads (with ``parents``: also the packages above
    each one, which Python loads first)."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
            if parents:
                parts = m.split(".")
                todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return seen


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join([*stack[stack.index(v) :], v]))
            elif not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])
    assert not cycles, cycles


def test_functional_imports_no_layer_and_the_core_no_model_library():
    graph = _graph()
    reached = _closure(graph, "constraint_layers.functional", parents=False)
    assert "constraint_layers.layer" not in reached
    for name, f in _modules().items():
        if name.startswith("constraint_layers.adapters"):
            continue
        # everywhere in the file: function-level imports too
        assert not _external(name, f, walk=True) & MODEL_LIBRARIES, name


def test_the_core_reaches_no_model_library_through_the_adapters():
    """What the core imports from the adapters (the registry, ``wrap``; module level or inside
    a function) loads no model library when imported: ``import constraint_layers`` and every
    core call work with torch alone."""
    mods = _modules()
    graph = _graph()
    wanted = set()
    for name, f in mods.items():
        if name.startswith("constraint_layers.adapters"):
            continue
        for _, names, base in _imports(name, f, walk=True):
            if base.startswith("constraint_layers.adapters"):
                wanted.add(base)
                wanted.update(f"{base}.{a}" for a in names if f"{base}.{a}" in mods)
    assert "constraint_layers.adapters" in wanted  # the check is not vacuous
    for start in [*sorted(wanted), "constraint_layers"]:
        for m in _closure(graph, start):
            if m in mods:
                used = _external(m, mods[m], walk=False) & MODEL_LIBRARIES
                assert not used, f"{start} imports {m}, which imports {used} at module level"


def test_adapters_import_the_model_libraries_they_serve():
    """Not vacuous: the adapters for neuraloperator and gpytorch do import them (lazily)."""
    mods = _modules()
    found = set()
    for name, f in mods.items():
        if name.startswith("constraint_layers.adapters"):
            found |= _external(name, f, walk=True) & MODEL_LIBRARIES
    assert found == MODEL_LIBRARIES


def test_the_engine_lives_in_one_package():
    engine = ROOT / "_engine"
    have = {str(f.relative_to(engine)) for f in engine.rglob("*.py")}
    assert ENGINE <= have, sorted(ENGINE - have)
    # the old paths are re-export shims: a docstring, imports and __all__, nothing else
    mods = _modules()
    for name in SHIMS:
        tree = ast.parse(mods[name].read_text())
        assert "Shim" in (ast.get_docstring(tree) or ""), name
        for node in tree.body[1:]:
            is_all = isinstance(node, ast.Assign) and [
                getattr(t, "id", None) for t in node.targets
            ] == ["__all__"]
            assert isinstance(node, (ast.ImportFrom, ast.Import)) or is_all, (name, node)


def test_outside_the_engine_only_its_entries_are_imported():
    """Modules outside ``_engine/`` (shims aside) import the engine's entry modules only, and
    public names only: the solvers (bounded, dependence, ...) are the dispatcher's to call."""
    bad = []
    for name, f in _modules().items():
        if name.startswith("constraint_layers._engine") or name in SHIMS:
            continue
        for _, names, base in _imports(name, f, walk=True):
            if not base.startswith("constraint_layers._engine"):
                continue
            sub = base.removeprefix("constraint_layers._engine").lstrip(".")
            picked = [sub] if sub else names  # ``from ._engine import dispatch``
            for mod in picked:
                if mod.split(".")[0] not in ENGINE_ENTRIES:
                    bad.append(f"{name} imports _engine.{mod}")
            if sub:
                bad += [f"{name} imports _engine.{sub}.{a}" for a in names if a.startswith("_")]
    assert not bad, bad
