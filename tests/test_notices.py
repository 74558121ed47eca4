"""THIRD_PARTY_NOTICES.md covers every model family and every file derived from an upstream, and each
such file names its upstream and copyright line in an SPDX header."""
import re
from pathlib import Path

import pytest

import zoo

REPO = Path(__file__).resolve().parents[1]
NOTICES = REPO / "THIRD_PARTY_NOTICES.md"
_FIELDS = ("Repository", "Licence", "Copyright", "Families", "Files")


def _entries():
    body = NOTICES.read_text().split("\n---\n")[0]
    entries = []
    for block in re.split(r"^## ", body, flags=re.M)[1:]:
        title = block.splitlines()[0].strip()
        fields = dict(re.findall(r"^- (\w+): (.*)$", block, flags=re.M))
        missing = [f for f in _FIELDS if f not in fields]
        assert not missing, f"notice {title!r} lacks {missing}"
        slug = re.search(r"github\.com/([\w.-]+/[\w.-]+)", fields["Repository"])
        assert slug, f"notice {title!r}: no GitHub repository URL"
        entries.append(dict(title=title, slug=slug.group(1), licence=fields["Licence"].split()[0],
                            copyright=fields["Copyright"].strip(),
                            families=[f.strip() for f in fields["Families"].split(",")],
                            files=[f.strip() for f in fields["Files"].split(",")]))
    return entries


ENTRIES = _entries()


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _family_file(family: str) -> str:
    package = REPO / "zoo" / "models" / family / "__init__.py"
    return (package if package.exists() else REPO / "zoo" / "models" / f"{family}.py").relative_to(REPO).as_posix()


def test_every_family_is_covered():
    families = zoo.list_families()
    covered = {f for e in ENTRIES for f in e["families"]}
    assert set(families) <= covered, f"families without an upstream notice: {sorted(set(families) - covered)}"
    assert covered <= set(families), f"notices name unknown families: {sorted(covered - set(families))}"
    for family in families:  # the family's own module is listed by an entry for that family
        owners = [e["title"] for e in ENTRIES if family in e["families"] and _family_file(family) in e["files"]]
        assert owners, f"{_family_file(family)} is not listed under a notice for family {family!r}"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["title"] for e in ENTRIES])
def test_listed_files_carry_the_upstream_header(entry):
    licences = {"MIT", "BSD-2-Clause", "Apache-2.0", "none"}
    assert entry["licence"] in licences, f"{entry['title']}: licence {entry['licence']!r}"
    for rel in entry["files"]:
        path = REPO / rel
        assert path.is_file(), f"{entry['title']}: listed file {rel} does not exist"
        header = _header(path)
        spdx = re.search(r"^# SPDX-License-Identifier: (.+)$", header, flags=re.M)
        assert spdx, f"{rel}: no SPDX-License-Identifier header"
        ids = set(spdx.group(1).split(" AND "))
        assert "Apache-2.0" in ids, rel
        if entry["licence"] != "none":
            assert entry["licence"] in ids, f"{rel}: SPDX header lacks {entry['licence']}"
        assert entry["slug"] in header, f"{rel}: header does not name {entry['slug']}"
        if entry["copyright"].startswith("Copyright"):
            assert entry["copyright"].rstrip(".") in header, f"{rel}: header lacks {entry['copyright']!r}"


def test_every_derived_file_is_listed():
    listed = {(f, e["slug"]) for e in ENTRIES for f in e["files"]}
    unlisted = []
    for path in sorted([*REPO.glob("zoo/**/*.py"), *REPO.glob("kernels/**/*.py")]):
        rel = path.relative_to(REPO).as_posix()
        for slug in re.findall(r"^# (?:Derived|Architecture) from ([\w.-]+/[\w.-]+)", _header(path), flags=re.M):
            if (rel, slug) not in listed:
                unlisted.append(f"{rel} ({slug})")
    assert not unlisted, f"derived files missing from THIRD_PARTY_NOTICES.md: {unlisted}"


def test_licence_files_are_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in text
    assert '"LICENSE"' in text and '"THIRD_PARTY_NOTICES.md"' in text
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]
