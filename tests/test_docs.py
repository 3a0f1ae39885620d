"""The documentation stays true to the code: the README is a front door from which every page of docs/ is one click
away, no relative link or anchor in README.md or docs/ is broken, and docs/config.md's table of every key is the
typed config's (pipeline/config.py holds the defaults; the table is checked against it, never the other way)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ditpipe.pipeline.config import Config, key_table

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tests" / "README.md"]


def _prose(path: Path):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for i, line in enumerate(path.read_text().split("\n"), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield i, line


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    out, seen = set(), {}
    for _, line in _prose(path):
        if m := re.match(r"^#{1,6} (.*)$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path):
    for i, line in _prose(path):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if not re.match(r"^[a-z]+:", target):
                yield i, target


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for i, target in _links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}:{i}: no file {target}")
            elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}:{i}: no heading for {target}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_one_click_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in _links(ROOT / "README.md")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links no page {missing}"


def test_the_readme_stays_a_front_door():
    assert len((ROOT / "README.md").read_text().split("\n")) <= 320  # about 300: the reference lives in docs/


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)


def test_the_config_page_lists_every_key_with_its_default_and_meaning():
    rows = {}
    text = (ROOT / "docs" / "config.md").read_text().split("## Every key", 1)[1]
    for m in re.finditer(r"^\| `([a-z_]+(?:\.[a-z_0-9]+)+)` \| `(.*?)` \| (.*) \|$", text, re.M):
        rows[m.group(1)] = (m.group(2), m.group(3).replace("\\|", "|"))
    want = {key: (_shown(default), meaning) for key, _, default, meaning in key_table(Config())}
    assert rows.keys() == want.keys(), f"missing {sorted(want.keys() - rows.keys())}, extra " \
                                       f"{sorted(rows.keys() - want.keys())}"
    wrong = [f"{k}: docs {rows[k]} != config {want[k]}" for k in want if rows[k] != want[k]]
    assert not wrong, "docs/config.md's table differs from pipeline/config.py:\n" + "\n".join(wrong)
