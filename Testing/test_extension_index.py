"""The entry for Slicer's Extensions Index (MedSegUNet.json, the catalog's JSON format, schema v1.0.2)
agrees with the extension's CMake metadata, and every URL the catalog shows points at a file of this
repository."""

from __future__ import annotations

import json
import re
from typing import Dict

import pytest
from conftest import REPO

ENTRY = REPO / "MedSegUNet.json"
# The catalog entry schema v1.0.2: required keys, and each allowed key's type (checked here by hand: no
# network at test time, and the schema is Slicer's text, not ours to ship).
REQUIRED = {"$schema", "category", "scm_url"}
TYPES = {
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool, "tier": int,
}  # fmt: skip
SCHEMA_URL = (
    "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
)


def entry_problems(entry: dict) -> list:
    problems = [f"missing {key}" for key in sorted(REQUIRED - set(entry))]
    problems += [f"unknown key {key}" for key in sorted(set(entry) - set(TYPES))]
    problems += [
        f"{key} is not a {TYPES[key].__name__}"
        for key in sorted(entry)
        if key in TYPES
        and not (isinstance(entry[key], TYPES[key]) and not (TYPES[key] is int and isinstance(entry[key], bool)))
    ]
    if not all(isinstance(item, str) for item in entry.get("build_dependencies", [])):
        problems.append("build_dependencies holds a non-string")
    if entry.get("scm_type", "git") not in ("git", "local"):
        problems.append("scm_type is neither git nor local")
    if isinstance(entry.get("tier"), int) and not 1 <= entry["tier"] <= 5:
        problems.append("tier is outside 1..5")
    return problems


def cmake_metadata() -> Dict[str, str]:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    return dict(re.findall(r'^set\((EXTENSION_[A-Z]+) "(.*)"\)', text, flags=re.M))


def test_the_catalog_entry_follows_the_schema():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    assert entry["$schema"] == SCHEMA_URL
    assert entry_problems(entry) == []
    bad = {"category": 3, "scm_url": "x", "tier": 9, "enabled": "yes", "build_dependencies": [1], "colour": "red"}
    assert entry_problems(bad) == [
        "missing $schema", "unknown key colour", "category is not a str", "enabled is not a bool",
        "build_dependencies holds a non-string", "tier is outside 1..5",
    ]  # fmt: skip


def test_the_catalog_entry_matches_the_extension_s_cmake_metadata():
    entry, cmake = json.loads(ENTRY.read_text(encoding="utf-8")), cmake_metadata()
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert cmake.get(f"EXTENSION_{field}"), f"EXTENSION_{field} is empty in CMakeLists.txt"
    assert entry["category"] == cmake["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split()
    assert (
        cmake["EXTENSION_HOMEPAGE"].startswith(entry["scm_url"] + "#")
        or cmake["EXTENSION_HOMEPAGE"] == entry["scm_url"]
    )


@pytest.mark.parametrize("field", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_the_catalog_s_pictures_are_files_of_this_repository(field):
    entry, cmake = json.loads(ENTRY.read_text(encoding="utf-8")), cmake_metadata()
    owner_repo = entry["scm_url"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{entry['scm_revision']}/"
    for url in cmake[field].split():
        assert url.startswith(prefix), url
        path = REPO / url.removeprefix(prefix)
        assert path.is_file(), f"{url} names {path.relative_to(REPO)}, which the repository lacks"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    if field == "EXTENSION_ICONURL":
        data = (REPO / cmake[field].removeprefix(prefix)).read_bytes()
        assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (128, 128)
