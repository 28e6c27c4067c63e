"""Every relative link and image of README.md and docs/**/*.md points at a file of the checkout, and at one of its
headings when it names an ``#anchor`` (GitHub's slugs: lowercase, spaces to ``-``, other punctuation dropped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: Markdown markup out, lowercase, punctuation dropped, spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _prose(path: Path) -> list[tuple[int, str]]:
    """The page's lines outside fenced code blocks, with their numbers."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m is None:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """The relative targets of the page's links and images (not URLs, not mail)."""
    found = []
    for number, line in _prose(path):
        for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)):  # inline code is not a link
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                found.append((number, target))
    return found


def test_the_slug_rules():
    assert slug("The two commands") == "the-two-commands"
    assert slug("Label sanity from the contract") == "label-sanity-from-the-contract"
    assert slug("On real data (flights)") == "on-real-data-flights"
    assert slug("Arrival order, re-delivery and retention") == "arrival-order-re-delivery-and-retention"
    assert slug("batch_scoring") == "batch_scoring"
    assert slug("`closedloop quarantine list`") == "closedloop-quarantine-list"


def broken(page: Path) -> list[str]:
    """The page's relative links whose file, or heading, does not exist."""
    out = []
    for number, target in links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.name}:{number}: {target}"
        if not dest.exists():
            out.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{where}: no heading #{anchor} in {dest.name}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_a_file_and_heading(page):
    assert not broken(page), "\n".join(broken(page))


def test_a_missing_file_or_heading_is_reported_and_code_is_not_a_link(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading, with punctuation!\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-code-heading-with-punctuation) [self](#page) ![img](gone.png)\n"
                    "[no anchor](other.md#nowhere) `[code](not-a-link.md)`\n\n```\n[fenced](not-either.md)\n```\n")
    assert broken(page) == ["page.md:3: gone.png: no such file", "page.md:4: other.md#nowhere: no heading #nowhere "
                            "in other.md"]


def test_the_check_sees_the_pages_and_their_links():
    assert len(PAGES) >= 10 and sum(len(links(p)) for p in PAGES) >= 20
