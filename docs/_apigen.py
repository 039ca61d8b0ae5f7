"""Write one API page per public module, listing every name of the module's ``__all__``.

Called from ``conf.py`` at every build, so a name added to ``__all__`` gets its page without
editing the docs. The pages are written under ``docs/api/`` (ignored by git); autosummary then
writes one stub page per name under ``docs/api/generated/``.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

# The public modules, in the order of the API index.
MODULES = [
    "constraint_layers",
    "constraint_layers.adapters",
    "constraint_layers.adapters.neuralop",
    "constraint_layers.adapters.neuralop_points",
    "constraint_layers.adapters.gpytorch",
    "constraint_layers.adapters.uqno",
    "constraint_layers.functional",
    "constraint_layers.local",
    "constraint_layers.metrics",
    "constraint_layers.errors",
    "constraint_layers.problems",
    "constraint_layers.pointcloud",
    "constraint_layers.quadrature",
    "constraint_layers.rows",
    "constraint_layers.testing",
]


def _home(obj: object) -> str | None:
    """The public module that documents a class listed by several modules: the one whose name is
    the longest prefix of the class's ``__module__`` (``Rows`` lives in ``constraint_layers.rows``).
    """
    owner = getattr(obj, "__module__", "") or ""
    homes = [m for m in MODULES if owner == m or owner.startswith(m + ".")]
    return max(homes, key=len) if homes else None


def _listed_elsewhere(obj: object, module_name: str) -> bool:
    """True for a class that several public modules list and whose page is another module's."""
    if not inspect.isclass(obj):
        return False
    listing = [m for m in MODULES if obj in _exports(m)]
    return len(listing) > 1 and _home(obj) not in (None, module_name) and _home(obj) in listing


def _exports(module_name: str) -> list[object]:
    module = importlib.import_module(module_name)
    return [getattr(module, n) for n in module.__all__]


def _page(module_name: str) -> str:
    module = importlib.import_module(module_name)
    names = list(module.__all__)
    modules = [n for n in names if inspect.ismodule(getattr(module, n))]
    elsewhere = [n for n in names if _listed_elsewhere(getattr(module, n), module_name)]
    objects = [n for n in names if n not in modules and n not in elsewhere]
    title = module_name
    lines = [
        title,
        "=" * len(title),
        "",
        f".. automodule:: {module_name}",
        "   :no-members:",
        "",
        f".. currentmodule:: {module_name}",
        "",
    ]
    if objects:
        lines += [".. autosummary::", "   :toctree: generated", "", *[f"   {n}" for n in objects]]
        lines.append("")
    if elsewhere:
        lines += ["Also here", "---------", ""]
        for n in elsewhere:
            home = _home(getattr(module, n))
            lines.append(f"- ``{n}``: the same object as :class:`{home}.{n}`.")
        lines.append("")
    if modules:
        lines += ["Submodules", "----------", ""]
        for n in modules:
            target = f"{module_name}.{n}"
            if target in MODULES:
                lines.append(f"- :doc:`{target}`")
            else:
                lines.append(f"- :mod:`{target}`")
        lines.append("")
    return "\n".join(lines)


def write_api_pages(folder: Path) -> None:
    """Write ``<module>.rst`` under ``folder`` for each module of `MODULES` (if changed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODULES:
        path = folder / f"{name}.rst"
        text = _page(name)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
