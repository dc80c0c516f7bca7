"""Test support for the launch scripts under bash without SLURM or GPUs: stub commands on PATH that record
their arguments, the NeMo-Run launcher loaded as a module, and a task script run as each of two nodes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "launch" / "jobs"

# Appends "NAME ARGS..." to $CALLS.
STUB = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $*" >> "$CALLS"
"""


def scontrol(*hosts: str) -> str:
    """A `scontrol` whose `show hostnames` lists `hosts`."""
    return f"""#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf '%s\\n' {" ".join(hosts)}
"""


def install_stubs(bin_dir: Path, stubs: dict[str, str]) -> None:
    bin_dir.mkdir(exist_ok=True)
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def option(call: list[str], name: str) -> str:
    """The value of `name` in a recorded command line (`--name value` or `--name=value`)."""
    for i, arg in enumerate(call):
        if arg == name:
            return call[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {call}")


def nemo_run_launcher() -> ModuleType:
    """launch/nemo_run_paced.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("nemo_run_paced", REPO / "launch" / "nemo_run_paced.py")
    module = sys.modules["nemo_run_paced"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_on_two_nodes(script: str, tmp_path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """Run a NeMo-Run task script as node 0 and node 1 of a two-node job (gpu-a, gpu-b), with `vllm`,
    `nemo-paced`, `scontrol` and `getent` stubbed; the commands each node ran."""
    bin_dir = tmp_path / "bin"
    install_stubs(bin_dir, {"vllm": STUB, "nemo-paced": STUB, "scontrol": scontrol("gpu-a", "gpu-b"),
                            "getent": "#!/usr/bin/env bash\necho \"10.0.0.1 $2\"\n"})
    calls = []
    for node in ("0", "1"):
        record = tmp_path / f"calls{node}"
        subprocess.run(["bash", "-c", script + "\nwait"], check=True, timeout=60,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(record),
                            "SLURM_NODEID": node, "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_ID": "7"})
        calls.append([line.split() for line in record.read_text().splitlines()])
    return calls[0], calls[1]
