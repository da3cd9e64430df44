"""History lint: the product speaks of what it is, never of how it was made.

Fails on development rounds named by ordinal (the Nth session or round), branch stages ("stage" glued to a number),
issue numbers, run dates (YYYY-MM-DD) and diary phrases (before/now arrows, replaced runs kept, when a run was last
made) in the tracked text files: README, docs, code, comments, docstrings, CLI help and test names. History belongs
in git and CHANGELOG.md, which the lint skips.

Usage: ``python .ci/history_lint.py`` checks every tracked text file of the repository (exit 1 on a hit);
``python .ci/history_lint.py FILE...`` checks those files only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ORDINALS = (
    "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|fourteenth|"
    "fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|thirtieth|twenty-\\w+|thirty-\\w+"
)

RULES: dict[str, re.Pattern[str]] = {
    "development round": re.compile(
        rf"\b(?:{ORDINALS}|earlier|later|previous|prior|past)[- ](?:session|round)s?\b", re.I
    ),
    "branch stage": re.compile(r"\bstage\d+\b", re.I),
    "issue number": re.compile(r"\bissues? ?#?\d+\b", re.I),
    "run date": re.compile(r"\b20\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b"),
    "diary phrase": re.compile(
        r"before\s*(?:→|->)\s*now|\bsupersed(?:e|es|ed|ing)\b|\bwhen (?:last|first) (?:made|drawn|run|measured)\b"
        r"|\bchanged with\b|\bin (?:an )?(?:earlier|later) runs?\b",
        re.I,
    ),
}

TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".sh", ".yml", ".yaml"}
TEXT_NAMES = {"Makefile", "run"}
# Where history belongs.
EXEMPT = {"CHANGELOG.md"}


def tracked_files(root: Path) -> list[Path]:
    """The repository's tracked text files that the lint reads."""
    listing = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True, text=True)
    paths = [Path(name) for name in listing.stdout.split("\0") if name]
    return [
        root / path
        for path in paths
        if str(path) not in EXEMPT and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES)
    ]


def hits(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, rule, line)`` for every line of ``path`` that speaks of the product's history."""
    found = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        for rule, pattern in RULES.items():
            if pattern.search(line):
                found.append((number, rule, line.strip()))
                break
    return found


def main(argv: list[str]) -> int:
    """Print every hit as ``path:line: rule: text``; return 1 when there is one, else 0."""
    root = Path(__file__).resolve().parent.parent
    paths = [Path(arg) for arg in argv] if argv else tracked_files(root)
    total = 0
    for path in paths:
        for number, rule, line in hits(path):
            print(f"{path}:{number}: {rule}: {line[:160]}")
            total += 1
    if total:
        print(f"{total} line(s) speak of the product's history; it belongs in git and CHANGELOG.md", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
