"""Run every case of ``tests/test_reliability.py`` and print the audit table.

    OMP_NUM_THREADS=1 python tests/reliability_audit.py [--all] [--fast]

``--all`` lists every case (default: only the ones not in the expected class); ``--fast`` skips
the slow cases (``torch.compile``).
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_reliability import CASES, CLASSES, Raises, outcome


def main(argv: list[str]) -> int:
    show_all = "--all" in argv
    cases = [c for c in CASES if not ("--fast" in argv and c.slow)]
    counts: Counter[str] = Counter()
    bad = []
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kind, detail = outcome(case)
        counts[kind] += 1
        expected = "clear error" if isinstance(case.expect, Raises) else "accepted correctly"
        if kind != expected or show_all:
            bad.append((case.name, kind, detail))
    for name, kind, detail in bad:
        print(f"[{kind}] {name}: {detail[:300]}")
    print()
    print(f"{'total cases':<22}{len(cases):>5}")
    for k in CLASSES:
        print(f"{k:<22}{counts[k]:>5}")
    return 0 if len(bad) == 0 or show_all else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
