"""A real one-node SLURM on 127.0.0.1 for the launch tests, started by `launch/slurm_local.sh`.

The session fixture `slurm` installs Debian's slurm-wlm and munge when they are missing (root and
apt needed), starts slurmctld and slurmd with their state in a temporary directory, and stops them
at the end of the session. The node advertises 8 CPUs, so the rollout service job runs beside a
training job on a 2-core machine, and listens on free ports, so two test sessions can run at once.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "launch" / "slurm_local.sh"
# States after which a job will not run again by itself.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]  # the test process's environment plus SLURM_CONF and the venv's bin/ on PATH

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_ids: list[str], timeout: float, states: set[str] = FINAL_STATES) -> dict[str, str]:
        """Wait until every job is in one of `states`; return their states. Fails with the logs on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            current = {j: self.job(j)["JobState"] for j in job_ids}
            if all(s in states for s in current.values()):
                return current
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs not in {sorted(states)} after {timeout:.0f} s: {current}")
            time.sleep(0.5)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    if os.geteuid() != 0 and not shutil.which("slurmctld"):
        pytest.skip("slurm: needs root to install and run a local slurm-wlm")
    root = tmp_path_factory.mktemp("slurm")
    ctld_port, slurmd_port = free_ports(2)  # a second test session on this machine gets its own cluster
    env = {**os.environ, "SLURM_ROOT": str(root), "SLURM_CPUS": "8", "SLURM_CTLD_PORT": str(ctld_port),
           "SLURMD_PORT": str(slurmd_port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    up = subprocess.run(["bash", str(SLURM_LOCAL), "up"], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        raise RuntimeError(f"launch/slurm_local.sh up failed:\n{up.stdout}\n{up.stderr}")
    env["SLURM_CONF"] = str(root / "etc" / "slurm.conf")
    try:
        yield SlurmCluster(root=root, env=env)
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "down"], env=env, capture_output=True, timeout=120)
