"""RELIABILITY.md is not stale: it matches what this session's reliability tests recorded.

This module runs last (see ``conftest.pytest_collection_modifyitems``). Every case recorded in this session
must appear in the file exactly as recorded; when the session ran every test the file names, the file must
hold nothing else; every test the file names must still exist; the README quotes the file's counts.
"""

from __future__ import annotations

import re

import pytest
from support.reliability import DOC, RECORDS, REPO, counts, parse, render, summary_line

pytestmark = pytest.mark.reliability

FIX = "Regenerate it with `make reliability` (runs the reliability tests and rewrites RELIABILITY.md)."


def _documented():
    assert DOC.exists(), f"{DOC} is missing. {FIX}"
    return parse(DOC.read_text())


def test_every_recorded_case_is_in_the_file(request):
    documented = set(_documented())
    recorded = set(RECORDS)
    missing = sorted(recorded - documented, key=str)
    assert not missing, f"RELIABILITY.md is stale: {len(missing)} case(s) recorded now are not in it, e.g. " \
                        f"{missing[:3]}. {FIX}"
    ran = {r.test for r in recorded}
    extra = sorted(r for r in documented - recorded if r.test in ran and _ran_whole_test(request, r.test))
    assert not extra, f"RELIABILITY.md is stale: it holds case(s) these tests no longer record: {extra[:3]}. {FIX}"


def _ran_whole_test(request, test: str) -> bool:
    """Whether every parametrisation of ``test`` was collected in this session (a -k filter may drop some)."""
    return bool(request.session.config.getoption("keyword") == "" and not request.session.config.getoption(
        "markexpr"))


def test_every_test_the_file_names_exists():
    for record in _documented():
        path, _, func = record.test.partition("::")
        source = REPO / path
        assert source.exists(), f"RELIABILITY.md names {record.test}, whose file is gone. {FIX}"
        assert re.search(rf"^\s*def {re.escape(func.split('::')[-1])}\(", source.read_text(), re.M), (
            f"RELIABILITY.md names {record.test}, which no longer exists. {FIX}")


def test_the_file_is_rendered_from_its_own_records():
    assert DOC.read_text() == render(_documented()) + "\n", f"RELIABILITY.md was edited by hand. {FIX}"


def test_readme_quotes_the_counts():
    line = summary_line(counts(_documented()))
    assert line in (REPO / "README.md").read_text(), (
        f"README.md must quote RELIABILITY.md's figures: {line!r}. Update the README's reliability paragraph.")
