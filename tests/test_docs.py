"""The documentation site builds with no warning: every page is in the nav and every link resolves.

`mkdocs build --strict` is part of the test suite (the ``test`` extra installs MkDocs) so that a moved
module or a renamed page breaks a test, not a reader's link.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="MkDocs is in the test extra: pip install -e '.[test]'")
    if not (ROOT / "mkdocs.yml").is_file():
        pytest.skip("not a source checkout")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()
    shutil.rmtree(tmp_path / "site", ignore_errors=True)


def test_architecture_page_names_every_layer_folder():
    """The architecture page and the package agree on which layer folders exist."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    folders = sorted(p.name for p in (ROOT / "ortq").iterdir() if (p / "__init__.py").is_file())
    assert folders, "no subpackages found"
    missing = [f for f in folders if f"`ortq/{f}/`" not in text]
    assert not missing, f"docs/architecture.md does not describe ortq/{missing}"
