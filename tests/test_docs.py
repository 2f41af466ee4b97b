"""The user's docs: README.md stays a short guide and every relative link or image in it, in docs/*.md and in
bench/README.md (generated from the result files) resolves (the file exists; an #anchor into a markdown file names
one of its headings, slugged as GitHub does)."""
import re
from pathlib import Path

import pytest
from conftest import ROOT

MAX_README_LINES = 300
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]  # the last: generated
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


def unfenced(text: str) -> str:
    """The text outside fenced code blocks (where a '# comment' is no heading)."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text outside code blocks and inline code, where a [x](y) is a link."""
    return re.sub(r"`[^`\n]*`", "", unfenced(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    heading = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in unfenced(page.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_readme_is_a_short_guide():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move the detail to docs/"


def test_the_slug_matches_githubs():
    assert slug("Compiled for the CPU (`--cpu-package`)") == "compiled-for-the-cpu---cpu-package"
    assert slug("Training from Python / in a notebook") == "training-from-python--in-a-notebook"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    links = LINK.findall(prose(page.read_text()))
    broken = []
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link, flags=re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading with anchor #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_no_machine_paths(page):
    """A user's copy has no ../shared or /work: the docs say DIR or FLOWERS128_DIR instead."""
    text = page.read_text()
    assert not re.search(r"\.\./shared|/work/", text), f"{page.relative_to(ROOT)} names a path of this machine"
