"""The documentation site builds with warnings as errors and has the pages it promises.

The build needs the ``docs`` extra (``make docs`` installs it); without Sphinx the build tests are
skipped. They are marked slow (the build takes about a minute on a loaded 2-core machine); CI
builds the site with ``make docs`` (.ci/run). The README and gallery checks need nothing.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# every example under examples/ and the gallery page that shows it
GALLERY = {
    "quickstart.py": "quickstart",
    "joint_constraints.py": "joint-constraints",
    "conservation_gp.py": "conservation-gp",
    "finetune_checkpoint.py": "finetune-checkpoint",
    "problems_generation_times.py": "problems-generation-times",
    "boundary_paper": "boundary-paper",
    "conservation_paper": "conservation-paper",
    "pointcloud": "pointcloud",
    "incompressible": "incompressible",
}


def _included_sections() -> set[str]:
    """The README sections that some page of the site includes."""
    found = set()
    for page in DOCS.rglob("*.md"):
        if page.name == "MOVING.md" or "_build" in page.parts:
            continue
        found |= set(re.findall(r":start-after: <!-- section:([\w-]+) -->", page.read_text()))
    return found


def test_every_readme_section_is_on_a_page():
    text = README.read_text()
    opened = re.findall(r"<!-- section:([\w-]+) -->", text)
    closed = re.findall(r"<!-- /section:([\w-]+) -->", text)
    assert opened, "no section markers in the README"
    assert opened == closed, "README section markers do not pair up"
    outside = re.sub(r"<!-- section:([\w-]+) -->\n.*?<!-- /section:\1 -->\n", "", text, flags=re.S)
    stray = re.findall(r"^## .*$", outside, flags=re.M)
    assert set(stray) <= {"## What it does", "## Documentation"}, (
        f"sections without markers: {stray}"
    )
    missing = set(opened) - _included_sections()
    assert not missing, f"README sections on no page of docs/: {sorted(missing)}"


def test_every_example_has_a_gallery_page():
    examples = {p.name for p in (ROOT / "examples").iterdir() if p.suffix == ".py" or p.is_dir()}
    examples -= {
        "__pycache__",
        "figures",
    }  # figures/: the committed figures of the top-level scripts
    assert examples == set(GALLERY), "an example without a gallery page (or a page without one)"
    for name, page in GALLERY.items():
        text = (DOCS / "gallery" / f"{page}.md").read_text()
        assert f"examples/{name}" in text, f"gallery/{page}.md does not name examples/{name}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("sphinx")
    for extension in ("furo", "numpydoc", "myst_parser"):
        pytest.importorskip(extension)
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html"]
    command += ["-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stderr[-6000:]}"
    return out / "html"


@pytest.mark.slow
def test_site_builds_with_the_promised_api_pages(site):
    generated = site / "api" / "generated"
    for name in ["wrap", "Dirichlet", "Conservation", "Bounds", "ConstraintLayer"]:
        assert (generated / f"constraint_layers.{name}.html").is_file(), name
    assert (generated / "constraint_layers.adapters.register.html").is_file()


@pytest.mark.slow
def test_every_public_name_has_a_page(site):
    sys.path.insert(0, str(DOCS))
    try:
        apigen = importlib.import_module("_apigen")
    finally:
        sys.path.remove(str(DOCS))
    for module_name in apigen.MODULES:
        module = importlib.import_module(module_name)
        page = (site / "api" / f"{module_name}.html").read_text()
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                assert (site / "api" / f"{module_name}.{name}.html").is_file(), name
            elif (site / "api" / "generated" / f"{module_name}.{name}.html").is_file():
                continue
            else:  # a class whose page is in the module that defines it
                assert name in page, f"{module_name}.{name} is on no page"


@pytest.mark.slow
def test_gallery_pages_show_their_figures(site):
    for page in GALLERY.values():
        assert (site / "gallery" / f"{page}.html").is_file(), page
    committed = sorted((ROOT / "examples").rglob("figures/*.png"))
    assert committed, "no committed figure"
    images = {p.name for p in (site / "_images").iterdir()}
    for figure in committed:
        assert figure.name in images, f"{figure} is not shown on the site"


def test_readme_split_is_mechanical(tmp_path):
    """docs/split_readme.py (the lead's last step, docs/MOVING.md) loses nothing, and leaves a
    README under 200 lines with its quickstart."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(README.read_text())
    for page in DOCS.rglob("*.md"):
        if "_build" in page.parts:
            continue
        target = tmp_path / page.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page.read_text())
    (tmp_path / "docs" / "conf.py").write_text((DOCS / "conf.py").read_text())
    sys.path.insert(0, str(DOCS))
    try:
        splitter = importlib.import_module("split_readme")
    finally:
        sys.path.remove(str(DOCS))
    splitter.split(tmp_path, write=True)

    after = (tmp_path / "README.md").read_text()
    assert len(after.splitlines()) < 200
    assert "<!-- section:quickstart -->" in after and "## Quickstart" in after
    pages = "\n".join(p.read_text() for p in (tmp_path / "docs").rglob("*.md"))
    before = README.read_text()
    for match in re.finditer(r"<!-- section:([\w-]+) -->\n(.*?)<!-- /section:\1 -->", before, re.S):
        name, body = match[1], match[2]
        if name in splitter.KEEP:
            assert body in after, name
            continue
        assert f"section:{name} -->" not in after, f"{name} still in the README"
        # every line of the section is on a page (headings may move up one level)
        for line in body.strip("\n").split("\n"):
            assert line.lstrip("#") in pages, f"{name}: lost {line!r}"
    assert "suppress_warnings" not in (tmp_path / "docs" / "conf.py").read_text()
