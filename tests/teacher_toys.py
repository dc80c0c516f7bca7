"""Shared pieces of the teacher tests: `nemo-paced serve-teacher` as a subprocess on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class TeacherServer:
    """`nemo-paced serve-teacher` as a subprocess; the address file says when and where it listens."""

    def __init__(self, model: Path, workdir: Path, *extra: str, env: dict | None = None) -> None:
        self.address = workdir / "teacher.addr"
        self.address.unlink(missing_ok=True)
        self.log = open(workdir / "teacher.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nemo_paced", "serve-teacher", "--teacher", str(model), "--port", "0",
             "--address-file", str(self.address), "--log-level", "warning", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180
        while not self.address.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"teacher service did not start: {Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.1)
        self.url = json.loads(self.address.read_text())["url"]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self.log.close()
        return code
