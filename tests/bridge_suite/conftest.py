"""The Megatron Bridge suite (`make test-bridge`): Bridge's own `pretrain()` on CPU under gloo.

Runs in `.venv-bridge` (Python 3.12, torch 2.13.0, megatron-core 0.19.2, megatron-bridge 0.6.2,
requirements/bridge.txt), where `make test-bridge` installs nemo-paced with containers/install.sh, as
in the NeMo container; the stages run on that installed copy (their working directory and import
path hold no source tree). Test-only shims: `shims.py`, each with its upstream file:line.

Writing a test — the fixtures:
- `tiny_models` (session): `.teacher` / `.student`, Qwen3 Hugging Face directories (3 and 2 layers,
  hidden 64, 320 vocabulary rows over a 17-token tokenizer; see `tiny.py`).
- `stage_inputs` (session): `.problems` (JSONL) and `.references` (verified teacher references).
- `rollout_service` (session): `nemo-paced serve-rollouts` over the student with the toy verifier
  `rollout_toys:first_char_in`, its pass-rate table estimated; `.address` is its address file.
  `start_rollout_service(model, problems, state)` starts the same service over another model.
- `bridge_stage` (function): `bridge_stage(out, stage="fkl", recipe=PAIR, nproc=2, overrides=[...],
  stop=None)` runs `nemo-paced train` under `torchrun --nproc-per-node nproc` with the CPU shims and
  the stage files above, `TINY` overrides first, yours after; `stop=(signal, after_step)` sends the
  signal to every rank once that step is recorded. Returns a `StageRun`: `.code` (exit status),
  `.records` (what each rank recorded: start / step losses and grad norm / export / exit), `.steps(rank)`,
  `.grad_norms(rank)`, `.first_batches(rank)` (the micro-batches that rank read for the run's first
  step), `.log`. Each launch costs 20-45 s: check several things per launch.
- `reference.py`: the loss and gradient norm of a step computed from those micro-batches with
  transformers in float64, independently of Megatron (`test_bridge_parity.py`).
A new recipe needs nothing else if its builder takes `StageFiles` like recipes/qwen3.py; pass its
name as `recipe=` (and its own shrinking overrides).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUITE = Path(__file__).parent
TESTS = SUITE.parent
PAIR = "qwen3_8b_to_1p7b"
# Shrink a recipe to the tiny models while keeping its code path (vocabulary, layout, checkpoints, signals).
TINY = ["train.train_iters=4", "train.global_batch_size=4", "model.seq_length=32", "dataset.seq_length=32",
        "dataset.template=raw", "dataset.refresh_every=2", "dataset.max_response_tokens=4",
        "checkpoint.save_interval=2", "optimizer.lr=1e-3", "optimizer.min_lr=1e-3"]
STAGE_TIMEOUT = 420

# Found, not imported: importing Bridge needs the shims, which only the suite's subprocesses apply.
# Elsewhere (`make test` in .venv) the suite is not collected: it runs in .venv-bridge, `make test-bridge`.
if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.bridge") is None:
    collect_ignore_glob = ["test_*.py"]


@dataclass(frozen=True)
class TinyModels:
    teacher: Path
    student: Path


@dataclass(frozen=True)
class StageInputs:
    problems: Path
    references: Path


@dataclass
class StageRun:
    code: int
    records: list[dict]
    log: str
    out: Path
    command: list[str] = field(default_factory=list)
    record: Path | None = None

    def steps(self, rank: int = 0) -> dict[int, dict]:
        """step (steps done, 1-based) -> the loss dict that rank recorded."""
        return {r["step"] + 1: r["loss"] for r in self.records if r["event"] == "step" and r["rank"] == rank}

    def grad_norms(self, rank: int = 0) -> dict[int, float]:
        """step (steps done, 1-based) -> the gradient norm Bridge computed (before clipping)."""
        return {r["step"] + 1: r["grad_norm"] for r in self.records if r["event"] == "step" and r["rank"] == rank}

    def first_batches(self, rank: int = 0) -> list[dict]:
        """The micro-batches `rank` read for the run's first step (stage.py saves them)."""
        import torch

        from stage import batches_path

        return torch.load(batches_path(str(self.record), rank), weights_only=False)

    def events(self, event: str, rank: int = 0) -> list[dict]:
        return [r for r in self.records if r["event"] == event and r["rank"] == rank]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    from tiny import write_qwen3

    root = tmp_path_factory.mktemp("models")
    return TinyModels(teacher=write_qwen3(root / "teacher", layers=3, hidden=64, seed=1),
                      student=write_qwen3(root / "student", layers=2, hidden=64, seed=2))


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory) -> StageInputs:
    from tiny import write_problems, write_references

    root = tmp_path_factory.mktemp("data")
    problems = write_problems(root / "problems.jsonl")
    return StageInputs(problems, write_references(root / "references.jsonl", problems))


def start_rollout_service(model: Path, problems: Path, state: Path):
    """`nemo-paced serve-rollouts` over `model` with the toy verifier, its pass-rate table estimated."""
    from rollout_toys import Server

    server = Server(model, problems, state, "--verifier", "rollout_toys:first_char_in", "--template", "raw",
                    "--k", "8", "--max-tokens", "4", "--seed", "0")
    with server.client() as client:
        client.wait(client.estimate(), poll=0.2, timeout=300)
    return server


@pytest.fixture(scope="session")
def rollout_service(tiny_models, stage_inputs, tmp_path_factory):
    server = start_rollout_service(tiny_models.student, stage_inputs.problems,
                                   tmp_path_factory.mktemp("service") / "state")
    yield server
    server.stop()


@pytest.fixture
def bridge_stage(tiny_models, stage_inputs, rollout_service, tmp_path):
    def run(out: Path, stage: str = "fkl", recipe: str = PAIR, nproc: int = 2, overrides: list[str] = (),
            stop: tuple[int, int] | None = None, init: Path | None = None) -> StageRun:
        return run_stage(out, stage, recipe, nproc, [*TINY, *overrides], stop, tiny_models, stage_inputs,
                         rollout_service.address, init=init, workdir=tmp_path)

    return run


def run_stage(out: Path, stage: str, recipe: str, nproc: int, overrides: list[str], stop, models: TinyModels,
              inputs: StageInputs, service: Path, *, init: Path | None, workdir: Path) -> StageRun:
    """torchrun of stage.py; see the module docstring."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"record-{time.monotonic_ns()}.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(SUITE / "stage.py"), "--recipe", recipe, "--stage", stage,
               "--init", str(init or models.student), "--teacher", str(models.teacher),
               "--problems", str(inputs.problems), "--references", str(inputs.references),
               "--service", str(service), "--out", str(out), *overrides]
    env = {**os.environ, "BRIDGE_SUITE_RECORD": str(record), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": _pythonpath(), "TORCH_DISTRIBUTED_DEBUG": "OFF"}
    log_path = out / f"{record.stem}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + STAGE_TIMEOUT
        sent = False
        while process.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise AssertionError(f"stage timed out; log tail:\n{log_path.read_text()[-6000:]}")
            if stop and not sent and _recorded_step(record, stop[1]):
                _signal_workers(process.pid, stop[0])
                sent = True
            time.sleep(0.2)
    records = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return StageRun(process.returncode, records, log_path.read_text(), out, command, record)


def _recorded_step(record: Path, step: int) -> bool:
    """True once rank 0 recorded step `step` (1-based steps done)."""
    if not record.exists():
        return False
    return any(r["event"] == "step" and r["rank"] == 0 and r["step"] + 1 >= step
               for r in map(json.loads, record.read_text().splitlines()))


def _signal_workers(agent_pid: int, sig: int) -> None:
    """Deliver `sig` to every worker rank, as srun does for train.sbatch (not to the torchrun agent)."""
    children = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        os.kill(int(pid), sig)


def shimmed_python(code: str, timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter with the shims applied (for Bridge calls that need no ranks);
    returns its stdout, raising with its stderr on failure."""
    prelude = "import shims\nshims.apply()\n"
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": _pythonpath(), "HF_HUB_OFFLINE": "1"},
                         cwd=SUITE)  # not the repository root, which would shadow the installed copy
    if out.returncode:
        raise AssertionError(f"exit {out.returncode}:\n{out.stderr[-6000:]}")
    return out.stdout


def _pythonpath() -> str:
    """The suite's helpers; nemo_paced comes from the environment (the installed copy), or from the
    source tree in $BRIDGE_SUITE_SOURCE (e.g. an old commit's, to see a test fail before its fix)."""
    return os.pathsep.join([p for p in (os.environ.get("BRIDGE_SUITE_SOURCE"), str(SUITE), str(TESTS)) if p])
