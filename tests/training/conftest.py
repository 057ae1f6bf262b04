"""Shared fixture of the training tests: a small real-text corpus."""
from pathlib import Path

import pytest

from sharnn_fast.training.data import stdlib_docstrings


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """30 KB of English prose (standard library docstrings): 27,000 / 1,500 / 1,500 bytes when split."""
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_bytes(stdlib_docstrings(30_000))
    return path
