"""The README's quickstart runs as written, and so do the guide's examples.

The guide pages (docs/) include README sections until the README is split (docs/MOVING.md); the
examples are looked up in the README and in the pages, so these tests hold before and after.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(*, pages: bool = True) -> list[str]:
    """The ```python blocks of the README, then of the docs pages (when ``pages``)."""
    texts = [README.read_text()]
    if pages:
        texts += [p.read_text() for p in sorted((ROOT / "docs").rglob("*.md"))]
    return [b for text in texts for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)]


def test_readme_quickstart_runs():
    pytest.importorskip("neuralop")
    blocks = _blocks(pages=False)
    assert blocks, "no python block in the README"
    exec(compile(blocks[0], "README quickstart", "exec"), {})


def test_readme_joint_example_runs():
    blocks = _blocks()
    joint = [b for b in blocks if "insulated" in b and "cl.Conservation.integral" in b]
    assert joint, "no joint example in the README or the guide"
    exec(compile(joint[0], "README joint example", "exec"), {})


def test_readme_point_cloud_example_runs():
    pytest.importorskip("scipy")
    blocks = _blocks()
    points = [b for b in blocks if "cl.NormalComponent" in b and "layout=" in b]
    assert points, "no point-cloud example in the README or the guide"
    exec(compile(points[0], "README point-cloud example", "exec"), {})
