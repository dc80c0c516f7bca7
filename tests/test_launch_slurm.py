"""The two-stage chain on a real one-node SLURM (tests/slurm_cluster.py), with the tiny CPU recipe."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from slurm_cluster import REPO, SlurmCluster, slurm  # noqa: F401  (slurm is a fixture)

pytestmark = pytest.mark.slurm
SUBMIT = REPO / "launch" / "paced_two_stage.sh"
STAGES = ["references", "rollouts", "estimate0", "stage1", "estimate1", "stage2", "eval", "finish"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """paced_two_stage.sh flags for the tiny CPU recipe's teacher, student and problems."""
    from dataclasses import asdict

    from nemo_paced.tasks import ChainTask
    from nemo_paced.tiny_models import TinyModelConfig, build_model

    root = tmp_path_factory.mktemp("tiny")
    task = ChainTask(max_level=2)
    model, tokenizer = build_model(task, TinyModelConfig())
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "problems.jsonl", "w") as f:
        for p in task.generate(1, 4, seed=0) + task.generate(2, 4, seed=1):
            f.write(json.dumps(asdict(p)) + "\n")
    engine = "--template raw --verifier nemo_paced.tasks.chain:verify --max-tokens 6"
    return ["--problems", str(root / "problems.jsonl"), "--teacher", str(root / "model"),
            "--student", str(root / "model"), "--benchmarks", str(root / "problems.jsonl"),
            "--engine", "hf", "--service-args", engine, "--reference-args", engine, "--eval-args", f"{engine} --n 2"]


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
