"""Citations of the design document point at something in the repository.

Code, error messages, README and MODEL_CARD cite ``docs/DESIGN.md section N``; a citation of a section
that does not exist, or of a bare ``DESIGN.md`` (a file outside the repository), sends a reader nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"
SOURCES = ("esrdf", "export", "engines", "runtime", "benchmarks", "tests")
SUFFIXES = {".py", ".md", ".h", ".cpp", ".txt", ".sh"}
CITATION = re.compile(r"docs/DESIGN\.md section (\d+)")
NAMED = re.compile(r'docs/DESIGN\.md section (\d+), "([^"]+)"')
BARE = re.compile(r"(?<![\w/])DESIGN\.md")


def _cited_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "MODEL_CARD.md"]
    for folder in SOURCES:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return [f for f in files if f != Path(__file__).resolve()]  # this file spells out what it looks for


def _sections() -> set[int]:
    return set(_section_texts())


def _section_texts() -> dict[int, str]:
    parts = re.split(r"^## (\d+)\. ", DESIGN.read_text(encoding="utf-8"), flags=re.M)
    return {int(n): text for n, text in zip(parts[1::2], parts[2::2], strict=True)}


def test_every_cited_section_exists() -> None:
    sections = _sections()
    assert sections == set(range(1, len(sections) + 1)), sections
    missing = [
        f"{path.relative_to(ROOT)}: section {n}"
        for path in _cited_files()
        for n in CITATION.findall(path.read_text(encoding="utf-8", errors="replace"))
        if int(n) not in sections
    ]
    assert not missing, missing


def test_no_citation_of_a_design_file_outside_the_repo() -> None:
    bare = []
    for path in _cited_files():
        for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if BARE.search(line.replace("docs/DESIGN.md", "")):
                bare.append(f"{path.relative_to(ROOT)}:{line_no}")
    assert not bare, bare


def test_a_named_part_is_in_the_cited_section() -> None:
    """``docs/DESIGN.md section 1, "Tiling"`` must find a **Tiling** paragraph in section 1."""
    texts = _section_texts()
    wrong = [
        f"{path.relative_to(ROOT)}: section {n}, {name!r}"
        for path in _cited_files()
        for n, name in NAMED.findall(path.read_text(encoding="utf-8", errors="replace"))
        if f"**{name}" not in texts.get(int(n), "")
    ]
    assert not wrong, wrong
