"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs():
    pytest.importorskip("neuralop")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "no python block in the README"
    exec(compile(blocks[0], "README quickstart", "exec"), {})


def test_readme_joint_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    joint = [b for b in blocks if "insulated" in b and "cl.Conservation.integral" in b]
    assert joint, "no joint example in the README"
    exec(compile(joint[0], "README joint example", "exec"), {})


def test_readme_point_cloud_example_runs():
    pytest.importorskip("scipy")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    points = [b for b in blocks if "cl.NormalComponent" in b and "layout=" in b]
    assert points, "no point-cloud example in the README"
    exec(compile(points[0], "README point-cloud example", "exec"), {})
