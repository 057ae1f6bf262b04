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


# --- issue 21, item 12: the README's examples run, and its synopsis names every flag ------------------

def readme_block(heading: str, language: str) -> str:
    """The first ```language code block after the README heading ``heading``."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^#+ {re.escape(heading)}\n.*?^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert match, f"no {language} block under {heading!r}"
    return match.group(1)


def test_the_drop_in_example_is_a_complete_script_that_runs_on_a_cpu(tmp_path):
    """It ran only on CUDA and left `batches` undefined."""
    import os
    import subprocess
    import sys

    script = tmp_path / "dropin.py"
    script.write_text(readme_block("Drop-in use in a training loop", "python"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    bpc = [float(line.split(": ")[1].split()[0]) for line in result.stdout.splitlines()]
    assert len(bpc) == 5 and bpc[-1] < bpc[0] - 0.5, result.stdout  # it trains: 5.0 -> 3.5 here


def _flags(text: str) -> set:
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))


@pytest.mark.parametrize("command", ["prepare", "train", "eval", "generate", "plot"])
def test_the_readme_synopsis_names_every_flag_of_each_command(command):
    """The train synopsis missed --memory, --schedule, --when, --split and --eval-batch-size."""
    import argparse

    from sharnn_fast.cli import build_parser

    block = readme_block("Training", "bash")
    lines = block.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(f"sharnn {command} ") or line == f"sharnn {command}")
    synopsis = [lines[first].split("#")[0]]
    for line in lines[first + 1:]:
        if not line.startswith(" "):
            break
        synopsis.append(line.split("#")[0])
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = subparsers.choices[command]
    expected = {flag for action in parser._actions if action.help != argparse.SUPPRESS
                for flag in action.option_strings if flag.startswith("--") and flag != "--help"}
    assert _flags(" ".join(synopsis)) == expected


def test_the_readme_points_at_checkpoints_where_train_saves_them():
    """The Generation example read runs/tiny/best.pt, a folder no command of the README writes:
    train saves to sharnn-runs/PRESET-DATE-TIME unless --save names another."""
    text = (ROOT / "README.md").read_text()
    saved = {Path(folder) for folder in re.findall(r"--save (\S+)", text)}
    for checkpoint in re.findall(r"sharnn (?:generate|eval) --checkpoint (\S+)", text):
        if checkpoint == "CKPT":  # the synopsis
            continue
        folder = Path(checkpoint).parent
        assert folder.parts[:1] == ("sharnn-runs",) or folder in saved, checkpoint
