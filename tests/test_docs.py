"""The docs: generated tables up to date, a short README, and no broken relative link."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 160
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for a page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", path.read_text())):
        text = re.sub(r"`|\*\*|__", "", title).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links of one page (outside code blocks) whose file or heading does not exist."""
    bad = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        rel = page.relative_to(root)
        if not dest.exists():
            bad.append(f"{rel}: ({target}): {file} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{rel}: ({target}): no heading #{anchor} in {dest.relative_to(root)}")
    return bad


def test_generated_tables_are_up_to_date() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "docs_tables.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"python scripts/docs_tables.py --check: {r.stderr.strip()}"


def test_readme_is_a_short_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move detail to docs/"
    for needed in ("bash scripts/demo.sh", "bash scripts/test.sh", "ftrecycle demo", "```mermaid", "@inproceedings"):
        assert needed in text, f"README.md lacks {needed!r}"


def test_relative_links_resolve() -> None:
    bad = [line for page in _pages() for line in broken_links(page)]
    assert not bad, f"{len(bad)} broken links:\n  " + "\n  ".join(bad)


def test_the_link_checker_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## (g) Compressed deltas\n")
    page.write_text(
        "[ok](other.md#g-compressed-deltas) [ok](#a-title) [web](https://example.com/x)\n"
        "# A title\n[gone](missing.md) [no heading](other.md#nope)\n```\n[in code](nowhere.md)\n```\n"
    )
    assert broken_links(page, tmp_path) == [
        "page.md: (missing.md): missing.md does not exist",
        "page.md: (other.md#nope): no heading #nope in other.md",
    ]
