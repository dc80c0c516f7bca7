"""launch/nemo_run_paced.py without a cluster: the same chain as paced_two_stage.sh, and its executors."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("nemo_run_paced", REPO / "launch" / "nemo_run_paced.py")
nemo_run_paced = sys.modules["nemo_run_paced"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nemo_run_paced)

ARGS = ["tiny_cpu", "--problems", "/data/p.jsonl", "--teacher", "/m/t", "--student", "/m/s",
        "--benchmarks", "/data/a.jsonl /data/b.jsonl"]


def config(*extra: str, run_dir: str = "/scratch/run"):
    cfg, _ = nemo_run_paced.parse_args([*ARGS, "--run-dir", run_dir, *extra])
    return cfg


def test_same_stages_and_dependencies_as_the_shell_launcher():
    out = subprocess.run(["bash", str(REPO / "launch" / "paced_two_stage.sh"), *ARGS, "--run-dir", "/x", "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    shell = {}
    for stage, rest in re.findall(r"^JOB_(\w+)=\$\((.*)\)$", out, re.M):
        dep = re.search(r"--dependency=(\w+):(\S+)", rest)
        shell[stage] = (dep.group(1), re.findall(r"JOB_(\w+)", dep.group(2))) if dep else ("afterok", [])
    assert shell == {stage: (kind, deps) for stage, (_, kind, deps) in nemo_run_paced.CHAIN.items()}


def test_commands_run_each_stage_with_its_inputs_and_outputs():
    cmds = nemo_run_paced.commands(config("--k", "4", "--train-args", "lr=1e-4 seed=3", "--stage-split", "0.25"))
    assert cmds["stage1"].splitlines()[0].startswith("export RANK=$SLURM_PROCID")
    assert ("nemo-paced train --recipe tiny_cpu --stage fkl --init /m/s --teacher /m/t --problems /data/p.jsonl "
            "--references /scratch/run/references.jsonl --passrates /scratch/run/rollouts/passrates.jsonl "
            "--service /scratch/run/rollouts.addr --out /scratch/run/stage1 --split 0.25 lr=1e-4 seed=3"
            ) in cmds["stage1"]
    assert "--stage rkl --init /scratch/run/stage1/final" in cmds["stage2"]
    assert "--out /scratch/run/stage2 --split 0.25" in cmds["stage2"]
    assert "--k 4 --state-dir /scratch/run/rollouts" in cmds["rollouts"]
    assert "--address-file /scratch/run/rollouts.addr" in cmds["rollouts"]
    assert "--weights-root /scratch/run " in cmds["rollouts"]  # /weights loads only the run's checkpoints
    assert "--checkpoint /scratch/run/stage1/final --wait" in cmds["estimate1"]
    assert "--benchmarks /data/a.jsonl /data/b.jsonl --out /scratch/run/eval.json" in cmds["eval"]
    assert cmds["finish"] == "scancel $(cat /scratch/run/rollouts.jobid)"


def test_executors_carry_the_cluster_knobs():
    cfg = config("--nodes", "2", "--gpus-per-node", "8", "--aux-gpus", "1", "--account", "acct", "--image",
                 "nvcr.io#nvidia/nemo:26.08", "--mounts", "/lustre:/lustre", "--signal-seconds", "90",
                 "--max-requeues", "3")
    train = nemo_run_paced.executor(cfg, "stage2")
    assert (train.nodes, train.ntasks_per_node, train.gpus_per_node) == (2, 8, 8)
    assert train.signal == "USR1@90" and train.retries == 3 and "MASTER_ADDR" in train.setup_lines
    assert train.container_image == "nvcr.io#nvidia/nemo:26.08"
    assert train.container_mounts == ["/scratch/run:/scratch/run", "/lustre:/lustre"]
    assert train.account == "acct" and train.additional_parameters == {"kill_on_invalid_dep": "yes"}
    assert nemo_run_paced.executor(cfg, "estimate0").dependency_type == "after"
    assert nemo_run_paced.executor(cfg, "finish").dependency_type == "afterany"
    service = nemo_run_paced.executor(cfg, "rollouts")
    assert (service.nodes, service.ntasks_per_node, service.gpus_per_node, service.signal) == (1, 1, 1, None)
    assert nemo_run_paced.executor(config(), "eval").account is None  # no --account unless given


@pytest.mark.parametrize("extra, message", [
    (["--stage-split", "2"], "stage_split must be a fraction strictly between 0 and 1 (both stages train), got 2.0"),
    (["--engine", "trt"], "engine must be hf or vllm, got 'trt'"),
    (["--nodes", "0"], "nodes must be at least 1, got 0"),
])
def test_bad_settings_are_named(extra, message, capsys):
    with pytest.raises(SystemExit):
        config(*extra)
    assert message in capsys.readouterr().err


def test_a_run_directory_nemo_run_would_rewrite_is_refused(capsys):
    with pytest.raises(SystemExit):
        config(run_dir="/scratch/nemo_run/x")
    assert "must not contain '/nemo_run'" in capsys.readouterr().err


def _shell_chain(*args: str) -> dict:
    out = subprocess.run(["bash", str(REPO / "launch" / "paced_two_stage.sh"), *args, "--run-dir", "/x", "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    shell = {}
    for stage, rest in re.findall(r"^JOB_(\w+)=\$\((.*)\)$", out, re.M):
        dep = re.search(r"--dependency=(\w+):(\S+)", rest)
        shell[stage] = (dep.group(1), re.findall(r"JOB_(\w+)", dep.group(2))) if dep else ("afterok", [])
    return shell


@pytest.mark.parametrize("teacher", ["self", "self:initial"])
def test_self_distillation_chain_has_no_references_and_no_forward_kl_stage(teacher):
    args = [*ARGS[:4], teacher, *ARGS[5:]]
    cfg = nemo_run_paced.parse_args([*args, "--run-dir", "/scratch/run"])[0]
    assert cfg.teacher == teacher and nemo_run_paced.chain(cfg) is nemo_run_paced.SELF_CHAIN
    assert list(nemo_run_paced.SELF_CHAIN) == ["rollouts", "estimate0", "self", "eval", "finish"]
    assert _shell_chain(*args) == {stage: (kind, deps) for stage, (_, kind, deps) in nemo_run_paced.SELF_CHAIN.items()}
    cmds = nemo_run_paced.commands(cfg)
    assert (f"nemo-paced train --recipe tiny_cpu --stage rkl --init /m/s --teacher {teacher} --problems /data/p.jsonl "
            "--passrates /scratch/run/rollouts/passrates.jsonl --service /scratch/run/rollouts.addr "
            "--out /scratch/run/self") in cmds["self"]
    assert "--references" not in cmds["self"] and "--split" not in cmds["self"]
    assert "--model /scratch/run/self/final" in cmds["eval"]
    assert nemo_run_paced.executor(cfg, "self").signal == "USR1@300"


def test_an_unknown_self_teacher_is_refused(capsys):
    with pytest.raises((SystemExit, ValueError)):
        nemo_run_paced.parse_args([*ARGS[:4], "self:frozen", *ARGS[5:]])
    failed = subprocess.run(["bash", str(REPO / "launch" / "paced_two_stage.sh"), *ARGS[:4], "self:frozen",
                             *ARGS[5:], "--dry-run"], capture_output=True, text=True)
    assert failed.returncode == 2 and "self, self:current or self:initial" in failed.stderr
