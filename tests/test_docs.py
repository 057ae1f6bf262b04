"""The documentation lives in the repository: every relative link in README.md, docs/ and
benchmarks/RESULTS.md must resolve to a file or folder inside it (a link that leaves the
repository, like ../shared/, is missing in a clone), and a link to a heading of a markdown file
must find that heading."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# README, docs/, and the rendered benchmark results (their plots and run files must be committed).
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *(ROOT / "docs").rglob("*.md")])
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def relative_links(document: Path):
    text = CODE.sub("", document.read_text())  # links inside code are examples, not links
    return [target for target in LINK.findall(text) if not EXTERNAL.match(target)]


def heading_anchors(document: Path) -> set:
    """The anchors GitHub gives the headings of a markdown file: lower case, punctuation other
    than - and _ dropped, spaces as -, a repeated heading numbered -1, -2, ..."""
    anchors, seen = set(), {}
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.DOTALL)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_there_are_documents_to_check():
    assert (ROOT / "docs" / "model.md") in DOCUMENTS and (ROOT / "README.md") in DOCUMENTS
    assert any(relative_links(d) for d in DOCUMENTS)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(document):
    problems = []
    for target in relative_links(document):
        path_part, _, anchor = target.partition("#")
        resolved = (document.parent / path_part).resolve() if path_part else document
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: leaves the repository (missing in a clone)")
        elif not resolved.exists():
            problems.append(f"{target}: {resolved.relative_to(ROOT)} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not problems, f"broken links in {document.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_checker_finds_broken_and_escaping_links(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text("[a](../shared/SPEC.md) [b](https://x.org/y) ![c](img.png \"title\")\n"
                        "`[not a link](nowhere.md)`\n[d](#local)\n")
    assert relative_links(document) == ["../shared/SPEC.md", "img.png", "#local"]
    assert heading_anchors(ROOT / "docs" / "model.md") >= {"constructor", "differences-from-the-published-code"}
