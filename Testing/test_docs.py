"""Every relative link and picture in the repository's Markdown resolves inside the repository, and no
file of the repository reaches outside it into the workspace's shared folder (not part of a clone)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import List

from conftest import REPO

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> List[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / name for name in listed.stdout.split()]


def broken_links(path: Path, root: Path = REPO) -> List[str]:
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        file_part = target.split("#", 1)[0]
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists() or root.resolve() not in (resolved, *resolved.parents):
            broken.append(target)
    return broken


def test_every_relative_link_in_the_markdown_resolves_inside_the_repository(tmp_path):
    files = markdown_files()
    assert REPO / "README.md" in files and REPO / "docs" / "architecture.md" in files
    assert {str(path.relative_to(REPO)): broken_links(path) for path in files if broken_links(path)} == {}
    tree = tmp_path / "tree"
    tree.mkdir()
    page = tree / "page.md"
    page.write_text("[a](missing.md) [b](https://x.org) [c](#here) ![d](../outside.png) [e](page.md#top)\n")
    (tmp_path / "outside.png").write_bytes(b"")  # exists, but outside the page's tree
    assert broken_links(page, root=tree) == ["missing.md", "../outside.png"]


def test_nothing_in_the_repository_reaches_outside_it():
    outside = "/".join(["..", "shared"])  # built, so that this file does not match itself
    found = subprocess.run(
        ["git", "grep", "-n", "--", outside, ":!*.png"], cwd=REPO, capture_output=True, text=True
    ).stdout.splitlines()
    assert found == []
