"""The documentation site builds with ``mkdocs build --strict`` (broken links and nav entries fail)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr
    assert (tmp_path / "site" / "distributed" / "index.html").exists()


def test_readme_names_the_test_command_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
