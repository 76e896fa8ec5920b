"""docs/python.md runs: every ``>>>`` line of its ``pycon`` blocks, in order, against the tiny real store
(tests/tiny_store.py), its printed output checked as doctest does. A block placed after the line
``<!-- tour: needs token strings -->`` runs only once the store holds token strings."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "python.md"
MARK = "<!-- tour: needs token strings -->"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
BLOCK = re.compile(r"^```pycon\n(.*?)^```$", re.S | re.M)


def blocks() -> list[tuple[int, str, bool]]:
    """``(line number, code, needs token strings)`` of each ``pycon`` block of the page."""
    text = DOC.read_text()
    out = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), bool(before) and before[-1] == MARK))
    return out


def _run_tour(store: Path, monkeypatch: pytest.MonkeyPatch, with_token_strings: bool) -> int:
    monkeypatch.chdir(store.parent)  # the page opens "qcache-store"
    parser, report = doctest.DocTestParser(), []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    globs: dict[str, object] = {}
    ran = 0
    for line, code, needs_strings in blocks():
        if needs_strings and not with_token_strings:
            continue
        test = parser.get_doctest(code, globs, f"python.md:{line}", str(DOC), line)
        runner.run(test, out=report.append, clear_globs=False)
        globs = test.globs  # (a DocTest runs on a copy): the next block sees this one's names
        ran += 1
    failed = runner.summarize(verbose=False).failed
    assert failed == 0, "docs/python.md is out of date:\n" + "".join(report)
    return ran


def test_the_page_has_its_blocks() -> None:
    found = blocks()
    assert len(found) >= 6 and sum(needs for *_, needs in found) == 1


def test_python_tour(tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run_tour(tiny_store, monkeypatch, with_token_strings=False) == len(blocks()) - 1


def test_python_tour_with_token_strings(tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run_tour(tiny_store, monkeypatch, with_token_strings=True) == len(blocks())
