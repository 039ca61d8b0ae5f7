"""Sphinx configuration for the constraint-layers site (`make docs`).

The build runs with warnings as errors (`sphinx-build -W --keep-going -n`): a broken
cross-reference, a public name without a docstring or a numpydoc section error fails it.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _apigen  # noqa: E402  (docs/_apigen.py: writes the API pages from each module's __all__)

project = "constraint-layers"
author = "constraint-layers developers"
copyright = "constraint-layers developers"
release = importlib.import_module("constraint_layers").__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# MOVING.md is the lead's note for finishing the README split, not a page of the site.
exclude_patterns = ["_build", "MOVING.md", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

html_theme = "furo"
html_title = f"constraint-layers {release}"
html_static_path: list[str] = []

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# The API pages: one per public module, one stub per name of its `__all__`.
_apigen.write_api_pages(HERE / "api")
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autoclass_content = "class"
# A method that overrides a documented one without a docstring of its own is documented once, on
# the class that defines the docstring (no copies on every subclass page).
autodoc_inherit_docstrings = False

# numpydoc: the class pages list their documented members through the autosummary template,
# not through numpydoc's own member tables (those would point at pages that do not exist).
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# Validation checks that fail the build. Chosen to be defensible for every public name:
#   GL08  the object has no docstring (a public name without documentation);
#   GL06  an unknown section name ("Return" for "Returns");
#   PR10  a parameter line "x:int" without the space before the colon (renders wrong).
# Not enforced: the per-parameter completeness checks (PR01/PR02: many short functions document
# their arguments in prose), summary punctuation and capitalisation (SS*, style only) and
# "See Also"/"Examples" presence (SA01/EX01), and section order (GL07: numpydoc renders the
# sections in its own order whatever the source order, so the page is the same). numpydoc's own
# parser still fails the build on a malformed section (it raises while rendering).
numpydoc_validation_checks = {"GL08", "GL06", "PR10"}
numpydoc_validation_exclude = {
    # dataclass/NamedTuple machinery and torch's nn.Module methods re-listed on subclasses
    r"\.__init__$",
    r"\.forward$",
    r"\.extra_repr$",
    # class attributes documented by a `#:` comment: numpydoc would validate their value's
    # docstring (a torch.dtype, None), not the comment
    r"^constraint_layers\.testing\.ConstraintLayerTests\.(dtype|reference_tol)$",
}

# No internet at build time, so no intersphinx: references to names of Python, torch, numpy,
# gpytorch, linear_operator and neuraloperator cannot resolve. They are ignored by name here;
# every reference to a constraint_layers name must resolve (nitpicky).
nitpicky = True
nitpick_ignore_regex = [
    # private helpers that public signatures mention (constraint_layers._tolerance.Tolerance, a
    # TypeVar of the registry) and the internal types of the refinement machinery
    (r"py:.*", r"constraint_layers(\.\w+)*\._\w+.*"),
    (r"py:.*", r"constraint_layers\.boundary\.(refine|spectral)(\.\w+)+"),
    (r"py:.*", r"(torch|numpy|np|nn|gpytorch|linear_operator|neuralop|scipy|lightning)(\..*)?"),
    (r"py:.*", r"(typing|collections\.abc|collections|abc|types|pathlib|os|enum|dataclasses)\..*"),
    (r"py:.*", r"(Tensor|Module|Parameter|LinearOperator|MultivariateNormal|Path|PathLike)"),
    (
        r"py:.*",
        r"(Any|Callable|Iterable|Iterator|Mapping|MutableMapping|Sequence|Literal|Optional|"
        r"Union|TypeVar|Self|ClassVar|NamedTuple|Protocol|Generator)",
    ),
    (
        r"py:.*",
        r"(int|float|bool|str|bytes|complex|object|type|tuple|list|dict|set|frozenset|"
        r"slice|None|NoneType|Ellipsis|ellipsis|callable|optional|default|array_like)",
    ),
    (
        r"py:.*",
        r"(Exception|ValueError|TypeError|RuntimeError|KeyError|IndexError|Warning|"
        r"UserWarning|RuntimeWarning|LookupError|ArithmeticError|FloatingPointError|"
        r"ImportError|ModuleNotFoundError|FileNotFoundError|OSError|NotImplementedError|"
        r"LinAlgError)",
    ),
]


_STAR = re.compile(r"(?<=[\s(\[,])\*(?=[A-Za-z_(])")


def _escape_shape_stars(app, what, name, obj, options, lines):
    """Show the docstrings' shape notation ``(*batch, N)`` as written, not as emphasis.

    The docstrings write shapes in plain text, ``(*batch, N)``; reST would read the ``*`` as the
    start of an emphasis. Inline literals (between double backticks) and doctest lines are left
    alone.
    """
    for i, line in enumerate(lines):
        if line.lstrip().startswith((">>>", "...")):
            continue
        parts = line.split("``")
        parts[::2] = [_STAR.sub(r"\\*", part) for part in parts[::2]]
        lines[i] = "``".join(parts)


def setup(app):
    # after numpydoc (priority 500), on the reST it produced
    app.connect("autodoc-process-docstring", _escape_shape_stars, priority=600)
