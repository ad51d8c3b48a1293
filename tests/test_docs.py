"""The documentation builds with ``mkdocs build --strict`` and points at files that exist."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", REPO / "docker" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_mkdocs_build_strict(tmp_path):
    """Broken links, anchors or nav entries are warnings, and --strict turns any warning into a failure."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "WARNING" not in output, output
    for page in ("distributed", "strategies", "checkpoints", "launching", "api", "benchmarks", "reliability"):
        assert (site / page / "index.html").exists(), page


def test_readme_names_the_test_command_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert readme.index("make test") < readme.index("## Usage")
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_readme_links_resolve():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (REPO / target).exists(), target


def test_paths_named_in_the_docs_exist():
    """Every repository path written in backticks (`launch/...`, `benchmarks/...`, ...) exists."""
    pattern = re.compile(r"`((?:launch|benchmarks|docker|scripts|tests|src/iteravg)/[\w./-]+?)`")
    missing = []
    for doc in DOC_FILES:
        for path in pattern.findall(doc.read_text()):
            if not (REPO / path).exists():
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert not missing, missing


def test_makefile_demo_uses_the_local_launch_script():
    assert "bash launch/horovodrun-local.sh $(NP) --out runs/demo" in (REPO / "Makefile").read_text()
    assert (REPO / "launch" / "horovodrun-local.sh").stat().st_mode & 0o111
