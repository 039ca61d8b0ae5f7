"""Finish the README split: move every README section that a docs page includes into that page.

Run once, from the repository root, after every branch is merged and every README section has
its markers (docs/MOVING.md):

    .venv/bin/python docs/split_readme.py --check   # says what it would do, writes nothing
    .venv/bin/python docs/split_readme.py           # does it

For each ``{include}`` of a README section (between ``<!-- section:NAME -->`` and
``<!-- /section:NAME -->``) in a page under docs/, the section's text replaces the include and
leaves the README. A page that has no title of its own before the include takes the section's
heading as its title (every heading of the section moves up one level). The sections in ``KEEP``
stay in the README (the pages go on including them), and the README gets the feature table and
the links into the site after its quickstart. The MyST heading-level warning that the includes
needed is switched back on in docs/conf.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# README sections a newcomer reads first, and the measured cost the README states with its
# command: they stay in the README.
KEEP = ("intro", "quickstart", "local-measured")

SECTION = re.compile(
    r"<!-- section:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /section:(?P=name) -->\n", re.S
)
INCLUDE = re.compile(
    r"```\{include\} (?P<path>\S*README\.md)\n"
    r":start-after: <!-- section:(?P<name>[\w-]+) -->\n"
    r":end-before: <!-- /section:(?P=name) -->\n"
    r"```\n"
)
SUPPRESS = re.compile(
    r"# The guide pages include README sections.*?\nsuppress_warnings = .*?\n", re.S
)

# The headings the split adds to the README (outside any marker pair); a second run adds nothing.
ADDED = ("## What it does", "## Documentation")

FEATURES = [
    (
        "Boundary conditions",
        "`cl.Dirichlet`, `cl.Neumann`, `cl.Periodic`, exact at any resolution (after BOON)",
        "boundary-conditions",
    ),
    (
        "Conservation",
        "`cl.Conservation`: linear rows and integrals, exact; Gaussian outputs conditioned"
        " (after ProbConserv)",
        "conservation",
    ),
    ("Both together", "one `cl.wrap`, every row exact", "boundary-and-conservation"),
    ("Bounds", "`cl.Bounds(lower, upper)` with every equality row, in one projection", "bounds"),
    ("Local constraints", "constraints at every cell", "local-constraints"),
    ("Point clouds", "scattered points: `cl.NormalComponent`, quadrature weights", "point-clouds"),
    ("Training", "neuraloperator's Trainer, Lightning, checkpoints", "training"),
    ("gpytorch", "the posterior stays a `MultivariateNormal`, samples obey the rows", "gpytorch"),
    ("Kernel refinement", 'BOON\'s `mode="refine"` of every Fourier layer', "kernel-refinement"),
    ("Your own models", "the adapter registry, entry points, the testing mixin", "extending"),
]

DOCS_BLOCK = (
    "## What it does\n\n| Feature | In one line | Guide |\n|---|---|---|\n"
    + "".join(f"| {f} | {d} | [{f.lower()}](docs/guide/{p}.md) |\n" for f, d, p in FEATURES)
    + """
## Documentation

`make docs` builds the site into `docs/_build/html` (its sources are readable as they are under
`docs/`): [getting started](docs/getting-started.md), [the user guide](docs/guide/index.md),
[the API reference](docs/api/index.md), [the gallery of examples](docs/gallery/index.md),
[the paper reproductions](docs/reproductions.md) and [the benchmarks](docs/benchmarks.md).
[CHANGELOG.md](CHANGELOG.md) is the release log.

"""
)


def _shift_up(text: str) -> str:
    """Every Markdown heading one level up (``##`` -> ``#``), outside fenced code blocks."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{2,6} ", line):
            line = line[1:]
        out.append(line)
    return "\n".join(out)


def _has_title_before(text: str, end: int) -> bool:
    fenced = False
    for line in text[:end].split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("# "):
            return True
    return False


def split(root: Path, write: bool) -> list[str]:
    """Do the split under ``root``; return what was done, one line each. Raises on a section
    without a page, a README heading outside the markers, or a page including an unknown one."""
    readme_path = root / "README.md"
    readme = readme_path.read_text()
    sections = {m["name"]: m["body"] for m in SECTION.finditer(readme)}
    outside = SECTION.sub("", readme)
    stray = [h for h in re.findall(r"^## .*$", outside, flags=re.M) if h not in ADDED]
    if stray:
        raise SystemExit(f"README headings outside any section markers: {stray}; add markers")
    pages = [
        p
        for p in sorted((root / "docs").rglob("*.md"))
        if "_build" not in p.parts and p.name != "MOVING.md"
    ]
    done, moved, new_pages = [], set(), {}
    for page in pages:
        text = page.read_text()
        pieces, last = [], 0
        for m in INCLUDE.finditer(text):
            name = m["name"]
            if name not in sections:
                raise SystemExit(f"{page}: includes README section {name!r}, which has no markers")
            if name in KEEP:
                continue
            body = sections[name].strip("\n") + "\n"
            if not _has_title_before(text, m.start()):
                body = _shift_up(body)
            pieces += [text[last : m.start()], body]
            last = m.end()
            moved.add(name)
            done.append(f"{name}: README -> {page.relative_to(root)}")
        if pieces:
            new_pages[page] = "".join(pieces) + text[last:]
    missing = set(sections) - moved - set(KEEP)
    if missing:
        raise SystemExit(f"README sections no page includes: {sorted(missing)}")
    kept = SECTION.sub(lambda m: "" if m["name"] in moved else m[0], readme)
    anchor = "<!-- /section:quickstart -->\n"
    if anchor not in kept:
        raise SystemExit("README has no quickstart section to put the links after")
    if ADDED[0] not in kept:
        kept = kept.replace(anchor, anchor + "\n" + DOCS_BLOCK, 1)
    kept = kept.rstrip("\n") + "\n"
    conf_path = root / "docs" / "conf.py"
    conf = SUPPRESS.sub("", conf_path.read_text())
    done.append(f"README.md: {len(readme.splitlines())} -> {len(kept.splitlines())} lines")
    if write:
        for page, text in new_pages.items():
            page.write_text(text)
        readme_path.write_text(kept)
        conf_path.write_text(conf)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="say what would move; write nothing")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    for line in split(args.root, write=not args.check):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
