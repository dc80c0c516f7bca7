"""containers/install.sh adds what is missing and never changes what the environment already has.

Run offline in a fresh virtual environment with toy packages standing in for the container's stack:
`toy-stack 1.0` plays megatron-core & co., `toy-missing` a dependency the container lacks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "containers" / "install.sh"


def make_wheel(directory: Path, name: str, version: str, deps: list[str]) -> Path:
    """A minimal pure-Python wheel, written directly: no build backend needed offline."""
    module, dist = name.replace("-", "_"), f"{name.replace('-', '_')}-{version}"
    files = {
        f"{module}/__init__.py": "",
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {d}\n" for d in deps),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def pip_versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split("==") for line in out.split())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("container")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    for name, version in [("toy-stack", "1.0"), ("toy-stack", "2.0"), ("toy-missing", "1.0")]:
        make_wheel(root / "wheels", name, version, [])
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(root / "wheels"), "PYTHON": str(python)}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "toy-stack==1.0"], env=pip_env, check=True)
    return root, python, pip_env


@pytest.mark.slow
def test_install_adds_missing_dependencies_and_keeps_the_stack(env):
    root, python, pip_env = env
    project = make_wheel(root / "ok", "toy-paced", "0.1", ["toy-stack>=1.0", "toy-missing"])
    result = subprocess.run(["bash", str(INSTALL), str(project)], env=pip_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    versions = pip_versions(python)
    assert versions["toy-stack"] == "1.0" and versions["toy-missing"] == "1.0" and versions["toy-paced"] == "0.1"
    assert "added toy-missing==1.0 toy-paced==0.1" in result.stdout


@pytest.mark.slow
def test_install_fails_rather_than_replace_a_package_of_the_stack(env):
    root, python, pip_env = env
    project = make_wheel(root / "greedy", "toy-greedy", "0.1", ["toy-stack>=2.0"])
    # Plain pip would upgrade toy-stack to 2.0 here; install.sh must refuse.
    result = subprocess.run(["bash", str(INSTALL), str(project)], env=pip_env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "conflicting dependencies" in result.stderr and "toy-stack>=2.0" in result.stdout + result.stderr
    versions = pip_versions(python)
    assert versions["toy-stack"] == "1.0" and "toy-greedy" not in versions
