"""The two-stage chain on a real one-node SLURM (tests/slurm_cluster.py), with the tiny CPU recipe."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import REPO, SlurmCluster, slurm  # noqa: F401  (slurm is a fixture)

# Each chain waits up to 900 s for its jobs; on the shared 2-core machine one test (two chains for some) can pass
# the suite's 600 s per-test limit (pyproject.toml), which would cut it off while its jobs still run correctly.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1800)]
SUBMIT = REPO / "launch" / "paced_two_stage.sh"
STAGES = ["references", "rollouts", "estimate0", "stage1", "estimate1", "stage2", "eval", "finish"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """Launcher flags for the tiny CPU recipe's teacher, student and problems, from the demo's
    `--prepare-only` (its models are cached in the demo's default cache, shared with the demo test)."""
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "nemo_paced", "demo", "--quick", "--prepare-only", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=1800)
    prepared = json.loads((out / "prepared.json").read_text())
    engine = f"--template raw --verifier exact --max-tokens {prepared['max_tokens']}"
    return ["--problems", prepared["problems"], "--teacher", prepared["teacher"], "--student", prepared["student"],
            "--benchmarks", prepared["problems"], "--engine", "hf", "--service-args", engine,
            "--reference-args", f"{engine} --temperature 0", "--eval-args", f"{engine} --n 2",
            "--train-args", "schedule.total_steps=200 checkpoint_every=2 progress=false"]


def submit_chain(cluster: SlurmCluster, run: Path, *args: str) -> dict[str, str]:
    result = cluster.run("bash", str(SUBMIT), "tiny_cpu", "--run-dir", str(run), "--gpus-per-node", "0",
                         "--aux-gpus", "0", "--cpus-per-task", "1", "--service-wait", "120", *args)
    ids = dict(line.split() for line in result.stdout.splitlines()[: len(STAGES)])
    assert list(ids) == STAGES, result.stdout
    return ids


def status(cluster: SlurmCluster, run: Path) -> subprocess.CompletedProcess:
    return cluster.run("bash", str(SUBMIT), "status", str(run), check=False)


def test_a_failed_stage_leaves_its_dependents_unrun_and_status_names_it(slurm, tiny, tmp_path):
    run = tmp_path / "run"
    ids = submit_chain(slurm, run, *tiny, "--fail-stage", "stage1")
    states = slurm.wait(list(ids.values()), timeout=300)

    assert states[ids["references"]] == "COMPLETED"
    assert states[ids["estimate0"]] == "COMPLETED"
    assert states[ids["stage1"]] == "FAILED" and slurm.job(ids["stage1"])["ExitCode"] == "3:0"
    for stage in ("estimate1", "stage2", "eval"):  # cancelled at once, never started: no log, no output
        job = slurm.job(ids[stage])
        assert (job["JobState"], job["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied")
        assert not list((run / "logs").glob(f"{stage}-*"))
    assert not (run / "stage2").exists() and not (run / "eval.json").exists()
    assert states[ids["finish"]] == "COMPLETED" and states[ids["rollouts"]] == "CANCELLED"  # service stopped

    report = status(slurm, run)
    assert report.returncode == 1
    log = run / "logs" / f"stage1-{ids['stage1']}.out"
    assert f"FAILED: stage stage1 (job {ids['stage1']}); its dependents were not run. Log: {log}" in report.stdout
    assert "failing on purpose: PACED_FAIL_STAGE=stage1" in log.read_text()


def logs(cluster: SlurmCluster, run: Path) -> str:
    """Every job log of the chain and the controller's log, for the message of a failed assertion."""
    parts = [f"--- {path.name}\n{path.read_text(errors='replace')}" for path in sorted((run / "logs").glob("*.out"))]
    controller = cluster.root / "log" / "slurmctld.log"
    if controller.exists():
        parts.append(f"--- slurmctld.log (last 40 lines)\n" + "\n".join(controller.read_text().splitlines()[-40:]))
    return "\n".join(parts)


def times(cluster: SlurmCluster, job_id: str) -> tuple[str, str]:
    job = cluster.job(job_id)
    return job["StartTime"], job["EndTime"]  # ISO timestamps: text order is time order


def preempt_when_checkpointed(cluster: SlurmCluster, job_id: str, checkpoint: Path, timeout: float = 600,
                              to_batch_script: bool = True) -> None:
    """Once the job has saved its first checkpoint, send what SLURM sends before the time limit:
    SIGUSR1 to the batch script (--signal=B:USR1, our sbatch scripts) or to the job's steps
    (--signal=USR1, NeMo-Run's template); then lift SLURM's two-minute hold on the requeued job.
    The stage must still be training when the signal lands (a signal during the final evaluation
    lets it finish), hence the tiny stages' 100 steps: the first checkpoint comes at step 2."""
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), cluster.job(job_id)
        assert time.monotonic() < deadline, f"no checkpoint {checkpoint} after {timeout} s"
        time.sleep(0.1)
    cluster.run("scancel", *(["--batch"] if to_batch_script else []), "--signal=USR1", job_id)
    cluster.wait([job_id], timeout=120, states={"PENDING"})
    # slurmd revokes the old run's credential with a one-second timestamp and refuses any credential
    # issued in that same second ("Job credential revoked", and the job ends FAILED): start the new
    # run two seconds later, not at once.
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def test_the_chain_runs_in_order_and_a_preempted_stage_resumes(slurm, tiny, tmp_path):
    run = tmp_path / "run"
    started = time.monotonic()
    ids = submit_chain(slurm, run, *tiny)
    preempt_when_checkpointed(slurm, ids["stage1"], run / "stage1" / "checkpoint.pt")
    states = slurm.wait(list(ids.values()), timeout=900)
    wall = time.monotonic() - started
    print(f"\ntwo-stage tiny chain on the local SLURM: {wall:.0f} s from submission to the last job's end")

    assert {s: states[ids[s]] for s in STAGES} == {**{s: "COMPLETED" for s in STAGES}, "rollouts": "CANCELLED"}, \
        logs(slurm, run)
    report = status(slurm, run)
    assert report.returncode == 0 and report.stdout.rstrip().endswith("COMPLETED"), report.stdout
    # in order: each job started after the jobs it depends on ended
    for later, earlier in [("stage1", "references"), ("stage1", "estimate0"), ("estimate1", "stage1"),
                           ("stage2", "estimate1"), ("eval", "stage2"), ("finish", "eval")]:
        assert times(slurm, ids[later])[0] >= times(slurm, ids[earlier])[1], (later, earlier)
    assert times(slurm, ids["estimate0"])[0] >= times(slurm, ids["rollouts"])[0]

    # stage 1 was preempted once, requeued, resumed from its checkpoint and reached the same final step
    assert slurm.job(ids["stage1"])["Restarts"] == "1"
    log = (run / "logs" / f"stage1-{ids['stage1']}.out").read_text()
    assert "got SIGUSR1, forwarding to the ranks" in log and "requeueing job" in log
    assert "checkpoint saved at step" in log  # stopped mid-stage, not after it
    result = json.loads((run / "stage1" / "result.json").read_text())
    steps = [m["step"] for m in result["history"]["steps"]]
    assert result["status"] == "done" and result["stage"] == "fkl" and steps == list(range(*result["stage_steps"]))
    assert result["step"] == len(steps)

    # the service served the training jobs (their pushed weights produced pass rates) and estimate1
    # re-estimated with the stage-1 student
    table = [json.loads(line) for line in (run / "rollouts" / "passrates.jsonl").read_text().splitlines()]
    assert any(f"{run}/stage2/weights/" in (row.get("checkpoint") or "") for row in table)
    estimate1 = (run / "logs" / f"estimate1-{ids['estimate1']}.out").read_text()
    assert f"loaded weights {run}/stage1/final" in estimate1
    assert (run / "stage2" / "final").is_dir()
    assert json.loads((run / "eval.json").read_text())["benchmarks"]


def test_the_nemo_run_launcher_submits_the_chain_to_the_same_slurm(slurm, tiny, tmp_path):
    run = tmp_path / "nemo-run"
    result = slurm.run(sys.executable, str(REPO / "launch" / "nemo_run_paced.py"), "tiny_cpu", "--run-dir", str(run),
                       "--gpus-per-node", "0", "--aux-gpus", "0", "--cpus-per-task", "1", "--service-wait", "120",
                       *tiny, timeout=300)
    jobs = [line.split("\t") for line in (run / "jobs.tsv").read_text().splitlines()]
    assert [stage for stage, _, _ in jobs] == STAGES, result.stdout
    for stage, job_id, _ in jobs:
        assert slurm.job(job_id)["JobName"] == f"paced-{stage}"
    stage1 = dict((stage, job_id) for stage, job_id, _ in jobs)["stage1"]
    # the time-limit warning reaches the trainer, which saves and exits non-zero; NeMo-Run's template requeues
    preempt_when_checkpointed(slurm, stage1, run / "stage1" / "checkpoint.pt", to_batch_script=False)
    states = slurm.wait([job_id for _, job_id, _ in jobs], timeout=900)
    assert [states[job_id] for _, job_id, _ in jobs] == ["COMPLETED" if s != "rollouts" else "CANCELLED"
                                                         for s in STAGES], logs(slurm, run)
    assert slurm.job(stage1)["Restarts"] == "1"
    first_run = "\n".join(p.read_text() for p in (run / "logs").glob(f"log-paced-stage1_{stage1}_0.out"))
    assert "checkpoint saved at step" in first_run  # stopped mid-stage, not after it
    trained = json.loads((run / "stage1" / "result.json").read_text())
    assert trained["status"] == "done" and [m["step"] for m in trained["history"]["steps"]] == list(
        range(*trained["stage_steps"]))
    assert status(slurm, run).returncode == 0
    assert json.loads((run / "eval.json").read_text())["benchmarks"]


SELF_STAGES = ["rollouts", "estimate0", "self", "eval", "finish"]
SELF_TRAIN = "schedule.total_steps=4 checkpoint_every=2 progress=false"


def _check_self_chain(run: Path, stages: dict[str, str], states: dict[str, str], cluster: SlurmCluster) -> None:
    """Every job ended as it should, training was reverse KL from the base student against itself."""
    assert {s: states[stages[s]] for s in SELF_STAGES} == {**{s: "COMPLETED" for s in SELF_STAGES},
                                                           "rollouts": "CANCELLED"}, logs(cluster, run)
    assert not (run / "references.jsonl").exists() and not (run / "stage1").exists()
    result = json.loads((run / "self" / "result.json").read_text())
    assert result["status"] == "done" and result["stage"] == "rkl"
    assert result["config"]["teacher"] == "self" and result["config"]["references"] is None
    assert [m["stage"] for m in result["history"]["steps"]] == ["rkl"] * 4
    assert (run / "self" / "final").is_dir() and json.loads((run / "eval.json").read_text())["benchmarks"]
    assert status(cluster, run).returncode == 0


def test_the_self_distillation_chain_runs_from_both_launchers(slurm, tiny, tmp_path):
    teacher = tiny.index("--teacher") + 1
    flags = [*tiny[:teacher], "self", *tiny[teacher + 1:], "--train-args", SELF_TRAIN]
    run = tmp_path / "self-shell"
    result = slurm.run("bash", str(SUBMIT), "tiny_cpu", "--run-dir", str(run), "--gpus-per-node", "0",
                       "--aux-gpus", "0", "--cpus-per-task", "1", "--service-wait", "120", *flags)
    ids = dict(line.split() for line in result.stdout.splitlines()[: len(SELF_STAGES)])
    assert list(ids) == SELF_STAGES, result.stdout
    _check_self_chain(run, ids, slurm.wait(list(ids.values()), timeout=900), slurm)
    for later, earlier in [("self", "estimate0"), ("eval", "self"), ("finish", "eval")]:
        assert times(slurm, ids[later])[0] >= times(slurm, ids[earlier])[1], (later, earlier)

    run = tmp_path / "self-nemo-run"
    slurm.run(sys.executable, str(REPO / "launch" / "nemo_run_paced.py"), "tiny_cpu", "--run-dir", str(run),
              "--gpus-per-node", "0", "--aux-gpus", "0", "--cpus-per-task", "1", "--service-wait", "120", *flags,
              timeout=300)
    jobs = dict(line.split("\t")[:2] for line in (run / "jobs.tsv").read_text().splitlines())
    assert list(jobs) == SELF_STAGES
    _check_self_chain(run, jobs, slurm.wait(list(jobs.values()), timeout=900), slurm)


FRONTIER_STAGES = ["references", "rollouts", "teacher", "estimate0", "cache", "stage1", "estimate1", "stage2", "eval",
                   "finish"]


def frontier_flags(tiny: list[str], run: Path) -> list[str]:
    """The frontier chain with the hf teacher service: a k = 4 cache, 4 + 4 tiny training steps, and a teacher
    path the training jobs could not load (a stage that tried would fail with 'no such directory')."""
    train = tiny.index("--train-args")
    return [*tiny[:train], "--teacher-engine", "hf", "--teacher-k", "4", "--cache-args", "--template raw",
            "--train-args", f"schedule.total_steps=8 checkpoint_every=2 progress=false teacher_k=4 "
                            f"teacher={run}/no-teacher-weights-here"]


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^nemo_paced_{name} (\S+)$", text, re.M).group(1))


def _check_frontier_chain(run: Path, stages: dict[str, str], states: dict[str, str], cluster: SlurmCluster) -> None:
    """Both services ran alongside and were stopped by finish; the cache was written from the service and read by
    stage 1; stage 2's samples were scored by the service; neither training job had the teacher's weights."""
    assert {s: states[stages[s]] for s in FRONTIER_STAGES} == {
        **{s: "COMPLETED" for s in FRONTIER_STAGES}, "rollouts": "CANCELLED", "teacher": "CANCELLED"}, logs(cluster, run)
    report = status(cluster, run)
    assert report.returncode == 0 and report.stdout.rstrip().endswith("COMPLETED"), report.stdout
    assert re.search(rf"^teacher +{stages['teacher']} +CANCELLED", report.stdout, re.M), report.stdout
    assert re.search(rf"^cache +{stages['cache']} +COMPLETED", report.stdout, re.M), report.stdout
    for later, earlier in [("cache", "references"), ("cache", "estimate0"), ("stage1", "cache"), ("finish", "eval")]:
        assert times(cluster, stages[later])[0] >= times(cluster, stages[earlier])[1], (later, earlier)

    index = json.loads((run / "teacher-cache" / "index.json").read_text())
    assert index["k"] == 4 and index["teacher"]["engine"].startswith("service") and index["entries"]
    assert index["passrates"]["path"] == f"{run}/rollouts/passrates.jsonl" and index["scored_tokens"] > 0
    absent = f"{run}/no-teacher-weights-here"
    assert not Path(absent).exists()
    stage1 = json.loads((run / "stage1" / "result.json").read_text())
    assert stage1["status"] == "done" and stage1["config"]["teacher_cache"] == f"{run}/teacher-cache"
    assert stage1["config"]["teacher"] == absent and stage1["config"]["teacher_service"] is None
    assert [m["stage"] for m in stage1["history"]["steps"]] == ["fkl"] * 4
    stage2 = json.loads((run / "stage2" / "result.json").read_text())
    assert stage2["status"] == "done" and stage2["config"]["teacher_service"] == f"{run}/teacher.addr"
    assert stage2["config"]["teacher"] == absent and stage2["config"]["teacher_cache"] is None
    assert [m["stage"] for m in stage2["history"]["steps"]] == ["rkl"] * 4
    # finish read the service's counters before stopping it: it scored the cache's tokens and then stage 2's samples
    served = (run / "teacher.metrics").read_text()
    assert metric(served, "teacher_tokens_total") > index["scored_tokens"], served
    assert metric(served, "teacher_sequences_total") >= sum(map(len, index["entries"].values())) + 4
    assert (run / "stage2" / "final").is_dir() and json.loads((run / "eval.json").read_text())["benchmarks"]


def test_the_frontier_teacher_chain_runs_from_both_launchers(slurm, tiny, tmp_path):
    run = tmp_path / "frontier-shell"
    result = slurm.run("bash", str(SUBMIT), "tiny_cpu", "--run-dir", str(run), "--gpus-per-node", "0",
                       "--aux-gpus", "0", "--cpus-per-task", "1", "--service-wait", "120", *frontier_flags(tiny, run))
    ids = dict(line.split() for line in result.stdout.splitlines()[: len(FRONTIER_STAGES)])
    assert list(ids) == FRONTIER_STAGES, result.stdout
    _check_frontier_chain(run, ids, slurm.wait(list(ids.values()), timeout=900), slurm)

    run = tmp_path / "frontier-nemo-run"
    slurm.run(sys.executable, str(REPO / "launch" / "nemo_run_paced.py"), "tiny_cpu", "--run-dir", str(run),
              "--gpus-per-node", "0", "--aux-gpus", "0", "--cpus-per-task", "1", "--service-wait", "120",
              *frontier_flags(tiny, run), timeout=300)
    jobs = dict(line.split("\t")[:2] for line in (run / "jobs.tsv").read_text().splitlines())
    assert list(jobs) == FRONTIER_STAGES
    _check_frontier_chain(run, jobs, slurm.wait(list(jobs.values()), timeout=900), slurm)


def test_a_failed_cache_job_cancels_the_training_and_finish_stops_both_services(slurm, tiny, tmp_path):
    run = tmp_path / "frontier-fail"
    result = slurm.run("bash", str(SUBMIT), "tiny_cpu", "--run-dir", str(run), "--gpus-per-node", "0",
                       "--aux-gpus", "0", "--cpus-per-task", "1", "--service-wait", "120", *frontier_flags(tiny, run),
                       "--fail-stage", "cache")
    ids = dict(line.split() for line in result.stdout.splitlines()[: len(FRONTIER_STAGES)])
    states = slurm.wait(list(ids.values()), timeout=600)
    assert states[ids["cache"]] == "FAILED" and slurm.job(ids["cache"])["ExitCode"] == "3:0", logs(slurm, run)
    for stage in ("stage1", "estimate1", "stage2", "eval"):
        job = slurm.job(ids[stage])
        assert (job["JobState"], job["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), stage
    assert not (run / "teacher-cache").exists() and not (run / "stage1").exists()
    assert states[ids["finish"]] == "COMPLETED"
    assert states[ids["rollouts"]] == states[ids["teacher"]] == "CANCELLED"
    report = status(slurm, run)
    log = run / "logs" / f"cache-{ids['cache']}.out"
    assert report.returncode == 1
    assert f"FAILED: stage cache (job {ids['cache']}); its dependents were not run. Log: {log}" in report.stdout
