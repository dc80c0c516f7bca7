"""containers/install.sh against this environment, which has the NeMo container's shape (Python 3.12,
torch, megatron-core 0.19, Megatron Bridge, ModelOpt pre-installed): nemo-paced goes in without
changing any package already there, `nemo-paced --help` works, and the rest of the suite (this file
runs first) uses that installed copy, not the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TESTS, _pythonpath

REPO = TESTS.parent
BIN = Path(sys.executable).parent


def _freeze() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("==", 1) for line in out.split() if "==" in line)


def test_install_sh_adds_only_nemo_paced_and_the_suite_runs_on_that_copy(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "nemo-paced"], check=True)
    before = _freeze()
    result = subprocess.run(["bash", str(REPO / "containers" / "install.sh"), str(REPO)], capture_output=True,
                            text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = _freeze()
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already there changed
    assert set(after) - set(before) == {"nemo-paced"}
    assert "install.sh: added nemo-paced==0.1.0" in result.stdout
    help_text = subprocess.run([str(BIN / "nemo-paced"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_text.returncode == 0 and "train" in help_text.stdout
    where = subprocess.run([sys.executable, "-c", "import nemo_paced, recipes; print(nemo_paced.__file__); "
                            "print(recipes.__file__)"], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": _pythonpath()}, check=True).stdout.split()
    if not os.environ.get("BRIDGE_SUITE_SOURCE"):
        assert "site-packages" in where[0] and "site-packages" in where[1], where
        assert not where[0].startswith(str(REPO / "nemo_paced")) and not where[1].startswith(str(REPO / "recipes"))
