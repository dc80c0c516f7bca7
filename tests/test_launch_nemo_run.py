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


FRONTIER = ["--teacher-engine", "hf"]


def test_frontier_chain_adds_the_teacher_and_cache_jobs_in_both_launchers():
    cfg = config(*FRONTIER)
    assert cfg.frontier and nemo_run_paced.chain(cfg) is nemo_run_paced.FRONTIER_CHAIN
    assert list(nemo_run_paced.FRONTIER_CHAIN) == ["references", "rollouts", "teacher", "estimate0", "cache", "stage1",
                                                   "estimate1", "stage2", "eval", "finish"]
    assert _shell_chain(*ARGS, *FRONTIER) == {
        stage: (kind, deps) for stage, (_, kind, deps) in nemo_run_paced.FRONTIER_CHAIN.items()}
    assert nemo_run_paced.FRONTIER_CHAIN["cache"][1:] == ("afterok", ["references", "estimate0"])
    assert nemo_run_paced.FRONTIER_CHAIN["stage1"][1:] == ("afterok", ["cache"])
    assert "teacher" not in _shell_chain(*ARGS) and "cache" not in _shell_chain(*ARGS)


def test_frontier_commands_keep_the_teacher_out_of_the_training_jobs():
    cmds = nemo_run_paced.commands(config(*FRONTIER, "--teacher-k", "16", "--cache-args", "--template raw",
                                          "--teacher-args", "--max-k 32"))
    assert ("nemo-paced train --recipe tiny_cpu --stage fkl --init /m/s --teacher-cache /scratch/run/teacher-cache "
            "--problems /data/p.jsonl --references /scratch/run/references.jsonl") in cmds["stage1"]
    assert ("--stage rkl --init /scratch/run/stage1/final --teacher-service /scratch/run/teacher.addr "
            "--problems") in cmds["stage2"]
    for stage in ("stage1", "stage2"):
        assert "--teacher " not in cmds[stage] and "/m/t" not in cmds[stage]
    assert ("nemo-paced teacher-cache --service /scratch/run/teacher.addr --teacher /m/t --problems /data/p.jsonl "
            "--references /scratch/run/references.jsonl --passrates /scratch/run/rollouts/passrates.jsonl --k 16 "
            "--out /scratch/run/teacher-cache --template raw") in cmds["cache"]
    assert cmds["cache"].startswith("for _ in") and "/scratch/run/teacher.addr ] && break" in cmds["cache"]
    assert ("nemo-paced serve-teacher --engine hf --teacher /m/t --port 0 --token-file /scratch/run/teacher.token "
            "--address-file /scratch/run/teacher.addr --max-k 32") in cmds["teacher"]
    assert "echo $SLURM_JOB_ID > /scratch/run/teacher.jobid" in cmds["teacher"]
    assert "nemo-paced make-references --engine vllm --teacher /m/t" in cmds["references"]
    assert cmds["finish"].endswith("scancel $(cat /scratch/run/rollouts.jobid) $(cat /scratch/run/teacher.jobid)")
    assert "> /scratch/run/teacher.metrics" in cmds["finish"]


def test_frontier_executors_give_the_teacher_its_own_nodes_and_image():
    cfg = config(*FRONTIER, "--teacher-nodes", "1", "--teacher-gpus", "8", "--teacher-image", "vllm.sqsh",
                 "--image", "nemo.sqsh", "--aux-gpus", "1")
    teacher = nemo_run_paced.executor(cfg, "teacher")
    assert (teacher.nodes, teacher.ntasks_per_node, teacher.gpus_per_node) == (1, 1, 8)
    assert teacher.container_image == "vllm.sqsh" and teacher.time == "1-00:00:00" and teacher.signal is None
    references = nemo_run_paced.executor(cfg, "references")
    assert (references.nodes, references.gpus_per_node, references.container_image) == (1, 8, "vllm.sqsh")
    cache = nemo_run_paced.executor(cfg, "cache")
    assert (cache.gpus_per_node, cache.container_image, cache.dependency_type) == (None, "nemo.sqsh", "afterok")
    assert nemo_run_paced.executor(cfg, "stage1").container_image == "nemo.sqsh"
    vllm = config("--teacher-engine", "vllm", "--teacher-nodes", "4", "--teacher-gpus", "8")
    assert (nemo_run_paced.executor(vllm, "teacher").nodes, vllm.teacher_image) == (4, None)
    assert config(*FRONTIER, "--aux-gpus", "2").teacher_gpus == 2  # default: --aux-gpus


@pytest.mark.parametrize("extra, message, shell_message", [
    (["--teacher-engine", "hf", "--teacher-nodes", "2"],
     "a teacher service on more than one node runs one multi-node vLLM deployment", None),
    (["--teacher-engine", "openai"], "drives a server you run: name it with", None),
    (["--teacher-engine", "hf", "--teacher-k", "0"], "teacher_k must be at least 1, got 0",
     "PACED_TEACHER_NODES and PACED_TEACHER_K must be at least 1"),
    (["--teacher-args", "--max-k 8"], "applies to the frontier chain only", None),
    (["--cache-args", "--template raw"], "applies to the frontier chain only", None),
])
def test_bad_frontier_settings_are_refused_by_both_launchers(extra, message, shell_message, capsys):
    with pytest.raises(SystemExit):
        config(*extra)
    assert message in capsys.readouterr().err
    failed = subprocess.run(["bash", str(REPO / "launch" / "paced_two_stage.sh"), *ARGS, *extra, "--dry-run"],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and (shell_message or message) in failed.stderr, failed.stderr


def test_a_self_teacher_cannot_be_a_frontier_teacher(capsys):
    args = [*ARGS[:4], "self", *ARGS[5:], *FRONTIER]
    with pytest.raises(SystemExit):
        nemo_run_paced.parse_args(args)
    assert "not the self-teacher 'self'" in capsys.readouterr().err
    failed = subprocess.run(["bash", str(REPO / "launch" / "paced_two_stage.sh"), *args, "--dry-run"],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "not the self-teacher 'self'" in failed.stderr
