"""The README's "Local constraints" example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_local_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    local = [b for b in blocks if "cl.DivergenceFree" in b]
    assert local, "no local-constraint example in the README"
    exec(compile(local[0], "README local example", "exec"), {})
