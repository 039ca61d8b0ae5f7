"""The distribution ships every subpackage: ``pyproject.toml`` lists packages explicitly, and an
editable install (what ``make test`` uses) finds an unlisted one anyway, so only this test sees a
new subpackage missing from a built wheel."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _listed() -> tuple[set[str], dict[str, str]]:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(conf["packages"]), dict(conf["package-dir"])


def test_every_subpackage_is_listed_in_pyproject():
    packages, dirs = _listed()
    found = set()
    for name, folder in dirs.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if "__pycache__" in rel:
                continue
            found.add(".".join((name, *rel)))
    missing, stale = sorted(found - packages), sorted(packages - found)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"
    assert not stale, f"pyproject.toml lists packages that do not exist: {stale}"
