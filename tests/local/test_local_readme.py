"""The "Local constraints" guide's example runs as written (docs/guide/local-constraints.md)."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "guide" / "local-constraints.md"


def test_guide_local_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    local = [b for b in blocks if "cl.DivergenceFree" in b]
    assert local, "no local-constraint example in the guide page"
    exec(compile(local[0], "local-constraints guide example", "exec"), {})
