#!/usr/bin/env python
"""PACED's two-stage chain as a NeMo-Run Experiment on SLURM, for users who launch with NeMo-Run.

The same jobs, commands and dependencies as `launch/paced_two_stage.sh` (see its --help), each a
NeMo-Run task with its own `SlurmExecutor`; the experiment submits them at once with
`--dependency`. It writes RUN_DIR/jobs.tsv in the shell launcher's format, so
`launch/paced_two_stage.sh status RUN_DIR` reports on either. Run it on a SLURM login node (NeMo-Run's
LocalTunnel): `python launch/nemo_run_paced.py RECIPE --problems ... [--dry-run]`.

Differences that come from NeMo-Run's batch template: a training job gets `--signal=USR1@S` (every
rank is signalled, saves a checkpoint and exits non-zero) and the template requeues the job while
`--max-requeues` allows; the rollout service records its job id in RUN_DIR/rollouts.jobid for the
`finish` task, since NeMo-Run hands out job ids only after submission.

With `--teacher self` (or self:current, self:initial) the chain is the self-distillation schedule:
rollouts, estimate0, self (reverse KL from the base student, no references), eval, finish.

With `--teacher-engine hf|vllm|openai` it is the frontier-teacher chain: a `teacher` service job on its
own nodes and image (RUN_DIR/teacher.addr; its job id in RUN_DIR/teacher.jobid) and a `cache` job
(top-k cache of the references, afterok references and estimate0); stage1 trains from the cache,
stage2 against the service, and the training jobs never see the teacher's weights.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ChainConfig:
    """Every knob of the chain; the field names are paced_two_stage.sh's flags, PACED_<NAME> its variables."""

    recipe: str
    problems: str
    teacher: str
    student: str
    benchmarks: list[str]
    run_dir: Path
    k: int = 8
    engine: str = "vllm"
    eval_engine: str = "hf"
    stage_split: float = 0.5
    train_args: list[str] = field(default_factory=list)
    service_args: list[str] = field(default_factory=list)
    reference_args: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    account: str = ""
    partition: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 8
    aux_gpus: int = 1
    rollout_nodes: int = 1  # the rollout service job: nodes, GPUs per node (None: aux_gpus), TP per student copy
    rollout_gpus: int | None = None
    rollout_tp: int = 1
    vllm_args: list[str] = field(default_factory=list)
    vllm_port: int = 8100
    cpus_per_task: int | None = None
    time: str = "04:00:00"
    aux_time: str = "02:00:00"
    service_time: str = "1-00:00:00"
    service_host: str | None = None
    service_wait: int = 1800
    signal_seconds: int = 300
    max_requeues: int = 10
    image: str | None = None
    mounts: list[str] = field(default_factory=list)
    # The frontier chain (teacher_engine set): the teacher service job and the top-k cache job.
    teacher_engine: str | None = None
    teacher_nodes: int = 1
    teacher_gpus: int | None = None  # per node (None: aux_gpus); also the references job's GPUs
    teacher_image: str | None = None  # of the teacher and references jobs (None: image)
    teacher_args: list[str] = field(default_factory=list)
    teacher_vllm_args: list[str] = field(default_factory=list)
    teacher_vllm_port: int = 8200
    teacher_k: int = 64
    cache_args: list[str] = field(default_factory=list)

    @property
    def self_distillation(self) -> bool:
        """The student is its own teacher (teacher self, self:current or self:initial)."""
        return is_self_teacher(self.teacher)

    @property
    def frontier(self) -> bool:
        """The teacher runs only in its own service job (and the references job): teacher_engine is set."""
        return self.teacher_engine is not None

    def __post_init__(self) -> None:
        if self.teacher.startswith("self:") and not self.self_distillation:
            raise ValueError(f"the self-teacher is self, self:current or self:initial; got {self.teacher!r}")
        if self.rollout_gpus is None:
            self.rollout_gpus = self.aux_gpus
        if self.teacher_gpus is None:
            self.teacher_gpus = self.aux_gpus
        if self.teacher_image is None:
            self.teacher_image = self.image
        for name in ("k", "nodes", "signal_seconds", "rollout_nodes", "rollout_tp", "teacher_nodes", "teacher_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "aux_gpus", "max_requeues", "rollout_gpus", "teacher_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.rollout_nodes * self.rollout_gpus > 1:
            if self.engine != "vllm":
                raise ValueError(f"a rollout service on more than one GPU runs vLLM data parallelism: it needs "
                                 f"engine vllm, got {self.engine!r}")
            if self.rollout_gpus % self.rollout_tp:
                raise ValueError(f"rollout_gpus ({self.rollout_gpus}) must be a multiple of rollout_tp "
                                 f"({self.rollout_tp})")
        if not 0.0 < self.stage_split < 1.0:
            raise ValueError(f"stage_split must be a fraction strictly between 0 and 1 (both stages train), "
                             f"got {self.stage_split}")
        if "/nemo_run" in str(self.run_dir):  # NeMo-Run rewrites that string in its batch scripts
            raise ValueError(f"the run directory must not contain '/nemo_run', got {self.run_dir}")
        for name, value in (("engine", self.engine), ("eval_engine", self.eval_engine)):
            if value not in ("hf", "vllm"):
                raise ValueError(f"{name} must be hf or vllm, got {value!r}")
        if self.frontier:
            if self.teacher_engine not in ("hf", "vllm", "openai"):
                raise ValueError(f"teacher_engine must be hf, vllm or openai, got {self.teacher_engine!r}")
            if self.self_distillation:
                raise ValueError(f"a frontier teacher (teacher_engine) is a model directory, not the self-teacher "
                                 f"{self.teacher!r}")
            if self.teacher_nodes > 1 and self.teacher_engine != "vllm":
                raise ValueError(f"a teacher service on more than one node runs one multi-node vLLM deployment: it "
                                 f"needs teacher_engine vllm, got {self.teacher_engine!r}")
            if self.teacher_engine == "openai" and "--openai-url" not in self.teacher_args:
                raise ValueError("teacher_engine openai drives a server you run: name it with teacher_args "
                                 "'--openai-url http://HOST:PORT'")
        else:
            for name in ("teacher_args", "teacher_vllm_args", "cache_args"):
                if getattr(self, name):
                    raise ValueError(f"{name} applies to the frontier chain only: set teacher_engine too")
            if self.teacher_image != self.image:
                raise ValueError("teacher_image applies to the frontier chain only: set teacher_engine too")


SELF_TEACHERS = ("self", "self:current", "self:initial")


def is_self_teacher(teacher: str) -> bool:
    return teacher in SELF_TEACHERS


def commands(cfg: ChainConfig) -> dict[str, str]:
    """The bash each task runs (one copy per SLURM task), as in launch/jobs/*.sbatch."""
    run = str(cfg.run_dir)
    q = shlex.quote

    def paced(*args: str) -> str:
        return "exec nemo-paced " + " ".join(q(a) for a in args)

    def train(stage: str, objective: str, init: str) -> str:
        two_stage = not cfg.self_distillation  # self-distillation: one stage, no references
        teacher = ["--teacher", cfg.teacher]
        if cfg.frontier:  # the teacher never in the job, not even its path: its cache, or its service
            teacher = (["--teacher-cache", f"{run}/teacher-cache"] if objective == "fkl"
                       else ["--teacher-service", f"{run}/teacher.addr"])
        files = ["--init", init, *teacher, "--problems", cfg.problems,
                 *(["--references", f"{run}/references.jsonl"] if two_stage else []),
                 "--passrates", f"{run}/rollouts/passrates.jsonl", "--service", f"{run}/rollouts.addr",
                 "--out", f"{run}/{stage}", *(["--split", str(cfg.stage_split)] if two_stage else [])]
        ranks = "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS\n"
        return ranks + paced("train", "--recipe", cfg.recipe, "--stage", objective, *files, *cfg.train_args)

    engine: tuple[str, ...] = ("--engine", cfg.engine)
    deployment = ""
    dp = cfg.rollout_nodes * cfg.rollout_gpus // cfg.rollout_tp
    if cfg.engine == "vllm" and dp > 1:
        # One vLLM data-parallel deployment over the job's GPUs (every node runs this script once):
        # node 0 serves the API on loopback for the service, the others run headless engines.
        per_node = cfg.rollout_gpus // cfg.rollout_tp
        serve = " ".join(q(a) for a in ("vllm", "serve", cfg.student, "--tensor-parallel-size", str(cfg.rollout_tp),
                                        "--data-parallel-size", str(dp), "--data-parallel-size-local", str(per_node),
                                        "--data-parallel-rpc-port", "13345", *cfg.vllm_args))
        head = 'head=$(getent hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" | awk \'{print $1; exit}\')'
        deployment = "\n".join([
            head, f'dp=(env VLLM_SERVER_DEV_MODE=1 {serve} --data-parallel-address "$head")',
            f'[ "$SLURM_NODEID" = 0 ] || exec "${{dp[@]}}" --headless --data-parallel-start-rank $((SLURM_NODEID * {per_node}))',
            f'"${{dp[@]}}" --host 127.0.0.1 --port {cfg.vllm_port} &', ""])
        engine = ("--engine", "openai", "--openai-url", f"http://127.0.0.1:{cfg.vllm_port}", "--max-in-flight",
                  str(64 * dp), "--openai-startup-timeout", str(cfg.service_wait))
    estimate = ("estimate", "--service", f"{run}/rollouts.addr")

    def wait(address: str) -> str:  # a service needs a while to load its model before it publishes its address
        return (f"for _ in $(seq {max(cfg.service_wait // 2, 1)}); do [ -s {q(run)}/{address} ] && break; "
                "sleep 2; done\n")

    reference_engine: tuple[str, ...] = ("--engine", cfg.engine)
    if cfg.teacher_engine == "openai":  # through the server the teacher service scores with
        server = cfg.teacher_args
        reference_engine = ("--engine", "openai", *(arg for i in range(len(server) - 1)
                                                    if server[i] in ("--openai-url", "--openai-key-env")
                                                    for arg in server[i:i + 2]))
    scripts = {
        "references": paced("make-references", *reference_engine, "--teacher", cfg.teacher, "--problems", cfg.problems,
                            "--out", f"{run}/references.jsonl", *cfg.reference_args),
        "rollouts": deployment + "\n".join([
            f"echo $SLURM_JOB_ID > {q(run)}/rollouts.jobid", f"rm -f {q(run)}/rollouts.addr",
            f"host={q(cfg.service_host)}" if cfg.service_host else "host=$(hostname -I | awk '{print $1}')",
            f"(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {q(run)}/rollouts.token)",
            paced("serve-rollouts", *engine, "--model", cfg.student, "--problems", cfg.problems,
                  "--k", str(cfg.k), "--state-dir", f"{run}/rollouts", "--port", "0", "--token-file",
                  f"{run}/rollouts.token", "--address-file", f"{run}/rollouts.addr", "--weights-root", run,
                  *cfg.service_args) + ' --host "${host:-127.0.0.1}"']),
        "estimate0": wait("rollouts.addr") + paced(*estimate, "--wait"),
        "stage1": train("stage1", "fkl", cfg.student),
        "estimate1": wait("rollouts.addr") + paced(*estimate, "--checkpoint", f"{run}/stage1/final", "--wait"),
        "stage2": train("stage2", "rkl", f"{run}/stage1/final"),
        "self": train("self", "rkl", cfg.student),
        "eval": paced("eval", "--engine", cfg.eval_engine, "--model",
                      f"{run}/{'self' if cfg.self_distillation else 'stage2'}/final", "--benchmarks",
                      *cfg.benchmarks, "--out", f"{run}/eval.json", *cfg.eval_args),
        "finish": f"scancel $(cat {q(run)}/rollouts.jobid)",
    }
    if cfg.frontier:
        scripts["teacher"] = _teacher_command(cfg, paced)
        scripts["cache"] = wait("teacher.addr") + paced(
            "teacher-cache", "--service", f"{run}/teacher.addr", "--teacher", cfg.teacher, "--problems", cfg.problems,
            "--references", f"{run}/references.jsonl", "--passrates", f"{run}/rollouts/passrates.jsonl",
            "--k", str(cfg.teacher_k), "--out", f"{run}/teacher-cache", *cfg.cache_args)
        # Before stopping the teacher service, keep its /metrics (sequences and tokens scored).
        scripts["finish"] = "\n".join([
            f"url=$(sed -n 's/.*\"url\": *\"\\([^\"]*\\)\".*/\\1/p' {q(run)}/teacher.addr)",
            f'curl -sSf --max-time 30 -H "Authorization: Bearer $(cat {q(run)}/teacher.token)" "$url/metrics" '
            f"> {q(run)}/teacher.metrics || echo \"[paced] could not read the teacher service's metrics\" >&2",
            f"scancel $(cat {q(run)}/rollouts.jobid) $(cat {q(run)}/teacher.jobid)"])
    return scripts


def _teacher_command(cfg: ChainConfig, paced) -> str:
    """The teacher service job, as launch/jobs/teacher.sbatch: `serve-teacher`, in front of one multi-node
    `vllm serve` (TP over each node's GPUs, PP over the nodes) when vllm spans more than one node."""
    run, q = str(cfg.run_dir), shlex.quote
    engine: tuple[str, ...] = ("--engine", cfg.teacher_engine)
    if cfg.teacher_engine == "vllm" and cfg.teacher_gpus > 1:
        engine += ("--tensor-parallel-size", str(cfg.teacher_gpus))
    deployment = ""
    if cfg.teacher_engine == "vllm" and cfg.teacher_nodes > 1:
        # Every node runs this script once: node 0 the API on loopback for the service, the others headless.
        serve = " ".join(q(a) for a in ("vllm", "serve", cfg.teacher, "--tensor-parallel-size", str(cfg.teacher_gpus),
                                        "--pipeline-parallel-size", str(cfg.teacher_nodes), "--nnodes",
                                        str(cfg.teacher_nodes), "--max-logprobs", "256", *cfg.teacher_vllm_args))
        head = 'head=$(getent hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" | awk \'{print $1; exit}\')'
        deployment = "\n".join([
            head, f'vl=({serve} --master-addr "$head" --node-rank "$SLURM_NODEID")',
            '[ "$SLURM_NODEID" = 0 ] || exec "${vl[@]}" --headless',
            f'"${{vl[@]}}" --host 127.0.0.1 --port {cfg.teacher_vllm_port} &', ""])
        engine = ("--engine", "openai", "--openai-url", f"http://127.0.0.1:{cfg.teacher_vllm_port}")
    return deployment + "\n".join([
        f"echo $SLURM_JOB_ID > {q(run)}/teacher.jobid", f"rm -f {q(run)}/teacher.addr",
        "host=$(hostname -I | awk '{print $1}')",
        f"(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {q(run)}/teacher.token)",
        paced("serve-teacher", *engine, "--teacher", cfg.teacher, "--port", "0", "--token-file",
              f"{run}/teacher.token", "--address-file", f"{run}/teacher.addr", *cfg.teacher_args)
        + ' --host "${host:-127.0.0.1}"'])


# stage -> (job kind, dependency type, dependencies), as in paced_two_stage.sh
CHAIN = {
    "references": ("aux", "afterok", []),
    "rollouts": ("service", "afterok", []),
    "estimate0": ("aux", "after", ["rollouts"]),
    "stage1": ("train", "afterok", ["references", "estimate0"]),
    "estimate1": ("aux", "afterok", ["stage1"]),
    "stage2": ("train", "afterok", ["estimate1"]),
    "eval": ("aux", "afterok", ["stage2"]),
    "finish": ("small", "afterany", ["references", "estimate0", "stage1", "estimate1", "stage2", "eval"]),
}
# The self-distillation schedule: no references, no forward-KL stage.
SELF_CHAIN = {
    "rollouts": ("service", "afterok", []),
    "estimate0": ("aux", "after", ["rollouts"]),
    "self": ("train", "afterok", ["estimate0"]),
    "eval": ("aux", "afterok", ["self"]),
    "finish": ("small", "afterany", ["estimate0", "self", "eval"]),
}


# The frontier-teacher chain: the teacher's service job and the cache job join it; the references job runs on
# one of the teacher's nodes (its image and GPUs per node); stage1 waits for the cache.
FRONTIER_CHAIN = {
    "references": ("teacher_aux", "afterok", []),
    "rollouts": ("service", "afterok", []),
    "teacher": ("teacher", "afterok", []),
    "estimate0": ("aux", "after", ["rollouts"]),
    "cache": ("cpu", "afterok", ["references", "estimate0"]),
    "stage1": ("train", "afterok", ["cache"]),
    "estimate1": ("aux", "afterok", ["stage1"]),
    "stage2": ("train", "afterok", ["estimate1"]),
    "eval": ("aux", "afterok", ["stage2"]),
    "finish": ("small", "afterany", ["references", "estimate0", "cache", "stage1", "estimate1", "stage2", "eval"]),
}


def chain(cfg: ChainConfig) -> dict[str, tuple[str, str, list[str]]]:
    return SELF_CHAIN if cfg.self_distillation else FRONTIER_CHAIN if cfg.frontier else CHAIN


def executor(cfg: ChainConfig, stage: str):
    """A SlurmExecutor for one stage: resources by job kind, logs in RUN_DIR/logs."""
    import nemo_run as run
    from nemo_run.core.execution.slurm import SlurmJobDetails

    kind, dependency_type, _ = chain(cfg)[stage]
    nodes, tasks, gpus, time = {
        "aux": (1, 1, cfg.aux_gpus, cfg.aux_time),
        "service": (cfg.rollout_nodes, 1, cfg.rollout_gpus, cfg.service_time),
        "train": (cfg.nodes, max(cfg.gpus_per_node, 1), cfg.gpus_per_node, cfg.time),
        "small": (1, 1, 0, "00:05:00"),
        "teacher": (cfg.teacher_nodes, 1, cfg.teacher_gpus, cfg.service_time),
        "teacher_aux": (1, 1, cfg.teacher_gpus, cfg.aux_time),
        "cpu": (1, 1, 0, cfg.aux_time),
    }[kind]
    if kind == "teacher_aux" and cfg.teacher_engine == "openai":
        gpus = 0  # the references are generated through the teacher's server
    image = cfg.teacher_image if kind in ("teacher", "teacher_aux") else cfg.image
    ex = run.SlurmExecutor(
        account=cfg.account, partition=cfg.partition, qos=cfg.qos, nodes=nodes, ntasks_per_node=tasks,
        gpus_per_node=gpus or None, cpus_per_task=cfg.cpus_per_task, time=time,
        container_image=image, container_mounts=[f"{cfg.run_dir}:{cfg.run_dir}", *cfg.mounts],
        tunnel=run.LocalTunnel(job_dir=str(cfg.run_dir / "nemorun" / "experiments")), packager=run.Packager(),
        job_details=SlurmJobDetails(job_name=f"paced-{stage}", folder=str(cfg.run_dir / "logs")),
        additional_parameters={"kill_on_invalid_dep": "yes"}, dependency_type=dependency_type,
        job_name_prefix="paced-")
    ex.account = cfg.account or None  # no --account line at all when none is given
    if kind == "train":
        ex.signal = f"USR1@{cfg.signal_seconds}"
        ex.retries = cfg.max_requeues
        ex.setup_lines = "export MASTER_ADDR=$head_node_ip MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))"
    return ex


def submit(cfg: ChainConfig, dry_run: bool = False) -> dict[str, str]:
    """Add the chain to an Experiment and submit it (or print the sbatch scripts); returns stage -> job id."""
    import nemo_run as run

    if (cfg.run_dir / "jobs.tsv").exists():
        raise ValueError(f"{cfg.run_dir} already holds a submitted chain (jobs.tsv); pick another --run-dir")
    scripts = commands(cfg)
    with run.Experiment(f"paced-{cfg.recipe}", base_dir=str(cfg.run_dir / "nemorun")) as exp:
        task_ids: dict[str, str] = {}
        for stage, (_, _, deps) in chain(cfg).items():
            task_ids[stage] = exp.add(run.Script(inline=scripts[stage]), executor=executor(cfg, stage), name=stage,
                                      dependencies=[task_ids[d] for d in deps])
        if dry_run:
            exp.dryrun(log=True)
            return {}
        (cfg.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        exp.run(detach=True)
        ids = {stage: job.handle.partition("://")[2].split("/")[1] for stage, job in zip(chain(cfg), exp.jobs)}
    with open(cfg.run_dir / "jobs.tsv", "w") as f:
        for stage, job_id in ids.items():
            f.write(f"{stage}\t{job_id}\t{cfg.run_dir}/logs/log-paced-{stage}_{job_id}_0.out\n")
    return ids


def parse_args(argv: list[str] | None = None) -> tuple[ChainConfig, bool]:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="nemo_run_paced.py", description=__doc__.split("\n\n")[0],
        epilog="Every option defaults to its PACED_* environment variable (e.g. --gpus-per-node: "
               "PACED_GPUS_PER_NODE), as in launch/paced_two_stage.sh.")
    p.add_argument("recipe", help="training recipe name (nemo-paced train --recipe)")
    p.add_argument("--problems", default=env("PACED_PROBLEMS"), required=not env("PACED_PROBLEMS"),
                   help="training problems (JSONL, Parquet or HF dataset)")
    p.add_argument("--teacher", default=env("PACED_TEACHER"), required=not env("PACED_TEACHER"),
                   help="teacher model, or self[:current|:initial] for the self-distillation chain")
    p.add_argument("--student", default=env("PACED_STUDENT"), required=not env("PACED_STUDENT"),
                   help="base student model")
    p.add_argument("--benchmarks", default=env("PACED_BENCHMARKS"), required=not env("PACED_BENCHMARKS"),
                   help="evaluation sets, space-separated")
    p.add_argument("--run-dir", default=env("PACED_RUN_DIR"), help="where everything goes (default runs/RECIPE-nemo-run)")
    p.add_argument("--k", type=int, default=int(env("PACED_K", "8")), help="rollouts per problem (default 8)")
    p.add_argument("--engine", default=env("PACED_ENGINE", "vllm"), help="rollout engine hf|vllm (default vllm)")
    p.add_argument("--eval-engine", default=env("PACED_EVAL_ENGINE", "hf"), help="evaluation engine (default hf)")
    p.add_argument("--stage-split", type=float, default=float(env("PACED_STAGE_SPLIT", "0.5")),
                   help="share of the recipe's training steps spent in stage 1, 0 < F < 1 (default 0.5)")
    p.add_argument("--train-args", default=env("PACED_TRAIN_ARGS", ""),
                   help="recipe config overrides 'k=v ...' for both training stages")
    p.add_argument("--service-args", default=env("PACED_SERVICE_ARGS", ""), help="extra serve-rollouts flags")
    p.add_argument("--reference-args", default=env("PACED_REFERENCE_ARGS", ""), help="extra make-references flags")
    p.add_argument("--eval-args", default=env("PACED_EVAL_ARGS", ""), help="extra eval flags")
    p.add_argument("--account", default=env("PACED_ACCOUNT", ""), help="sbatch --account")
    p.add_argument("--partition", default=env("PACED_PARTITION"), help="sbatch --partition")
    p.add_argument("--qos", default=env("PACED_QOS"), help="sbatch --qos")
    p.add_argument("--nodes", type=int, default=int(env("PACED_NODES", "1")), help="nodes per training job")
    p.add_argument("--gpus-per-node", type=int, default=int(env("PACED_GPUS_PER_NODE", "8")),
                   help="GPUs (= ranks) per training node; 0 = CPU, one rank (default 8)")
    p.add_argument("--aux-gpus", type=int, default=int(env("PACED_AUX_GPUS", "1")),
                   help="GPUs of the rollout, reference, estimate and eval jobs (default 1)")
    p.add_argument("--rollout-nodes", type=int, default=int(env("PACED_ROLLOUT_NODES", "1")),
                   help="nodes of the rollout service job (default 1)")
    p.add_argument("--rollout-gpus", type=int, default=int(env("PACED_ROLLOUT_GPUS", "-1")),
                   help="GPUs per rollout service node (default: --aux-gpus); above one GPU in all (with "
                        "--engine vllm) the job runs one vLLM data-parallel deployment and the service drives it")
    p.add_argument("--rollout-tp", type=int, default=int(env("PACED_ROLLOUT_TP", "1")),
                   help="tensor parallelism of each student copy in that deployment (default 1)")
    p.add_argument("--vllm-args", default=env("PACED_VLLM_ARGS", ""), help="extra flags for that `vllm serve`")
    p.add_argument("--vllm-port", type=int, default=int(env("PACED_VLLM_PORT", "8100")),
                   help="loopback port of that deployment's API (default 8100)")
    p.add_argument("--cpus-per-task", type=int, default=int(env("PACED_CPUS_PER_TASK", "0")) or None,
                   help="CPUs per task")
    p.add_argument("--time", default=env("PACED_TIME", "04:00:00"), help="training job time limit")
    p.add_argument("--aux-time", default=env("PACED_AUX_TIME", "02:00:00"), help="reference/estimate/eval limit")
    p.add_argument("--service-time", default=env("PACED_SERVICE_TIME", "1-00:00:00"), help="rollout service limit")
    p.add_argument("--service-host", default=env("PACED_SERVICE_HOST"),
                   help="address the rollout service binds (default: its node's first `hostname -I` address)")
    p.add_argument("--service-wait", type=int, default=int(env("PACED_SERVICE_WAIT", "1800")),
                   help="how long estimate jobs wait for the service's address (default 1800)")
    p.add_argument("--signal-seconds", type=int, default=int(env("PACED_SIGNAL_SECONDS", "300")),
                   help="signal training jobs this long before their limit (default 300)")
    p.add_argument("--max-requeues", type=int, default=int(env("PACED_MAX_REQUEUES", "10")),
                   help="how often a training job may be requeued (default 10)")
    p.add_argument("--image", default=env("PACED_IMAGE"), help="container image for pyxis/enroot")
    p.add_argument("--mounts", default=env("PACED_MOUNTS", ""), help="extra container mounts SRC:DST[,SRC:DST]")
    frontier = p.add_argument_group("frontier teacher (the teacher only in its own service job; all but "
                                    "--teacher-engine need it)")
    frontier.add_argument("--teacher-engine", default=env("PACED_TEACHER_ENGINE") or None,
                          choices=["hf", "vllm", "openai"],
                          help="submit the frontier chain; engine of `serve-teacher` (vllm on more than one node: "
                               "one multi-node `vllm serve` driven through the openai engine; openai: a server you "
                               "run, named by --openai-url in --teacher-args)")
    frontier.add_argument("--teacher-nodes", type=int, default=int(env("PACED_TEACHER_NODES", "1")),
                          help="nodes of the teacher service job (default 1)")
    frontier.add_argument("--teacher-gpus", type=int, default=int(env("PACED_TEACHER_GPUS", "-1")),
                          help="GPUs per teacher node, also of the references job (default: --aux-gpus)")
    frontier.add_argument("--teacher-image", default=env("PACED_TEACHER_IMAGE"),
                          help="container image of the teacher and references jobs (default: --image)")
    frontier.add_argument("--teacher-args", default=env("PACED_TEACHER_ARGS", ""),
                          help="extra serve-teacher flags (e.g. '--max-k 64')")
    frontier.add_argument("--teacher-vllm-args", default=env("PACED_TEACHER_VLLM_ARGS", ""),
                          help="extra flags for the teacher's multi-node `vllm serve`")
    frontier.add_argument("--teacher-vllm-port", type=int, default=int(env("PACED_TEACHER_VLLM_PORT", "8200")),
                          help="loopback port of that deployment's API (default 8200)")
    frontier.add_argument("--teacher-k", type=int, default=int(env("PACED_TEACHER_K", "64")),
                          help="top-k log-probs per token kept in the cache (default 64); the reverse-KL stage's k "
                               "is the recipe's (tiny_cpu: teacher_k=K in --train-args)")
    frontier.add_argument("--cache-args", default=env("PACED_CACHE_ARGS", ""),
                          help="extra teacher-cache flags: the training run's --template and kernel")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir or f"runs/{a.recipe}-nemo-run").absolute()

    def local(path: str) -> str:  # local paths become absolute; dataset names pass unchanged
        return str(Path(path).absolute()) if os.path.exists(path) else path

    try:
        cfg = ChainConfig(
            recipe=a.recipe, problems=local(a.problems),
            teacher=a.teacher if is_self_teacher(a.teacher) else local(a.teacher), student=local(a.student),
            benchmarks=[local(b) for b in a.benchmarks.split()], run_dir=run_dir, k=a.k, engine=a.engine,
            eval_engine=a.eval_engine, stage_split=a.stage_split, train_args=a.train_args.split(),
            service_args=a.service_args.split(), reference_args=a.reference_args.split(),
            eval_args=a.eval_args.split(),
            account=a.account, partition=a.partition, qos=a.qos, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
            aux_gpus=a.aux_gpus, rollout_nodes=a.rollout_nodes,
            rollout_gpus=None if a.rollout_gpus < 0 else a.rollout_gpus, rollout_tp=a.rollout_tp,
            vllm_args=a.vllm_args.split(), vllm_port=a.vllm_port, cpus_per_task=a.cpus_per_task, time=a.time, aux_time=a.aux_time,
            service_time=a.service_time, service_host=a.service_host, service_wait=a.service_wait,
            signal_seconds=a.signal_seconds, max_requeues=a.max_requeues,
            image=a.image, mounts=[m for m in a.mounts.split(",") if m],
            teacher_engine=a.teacher_engine, teacher_nodes=a.teacher_nodes,
            teacher_gpus=None if a.teacher_gpus < 0 else a.teacher_gpus, teacher_image=a.teacher_image,
            teacher_args=a.teacher_args.split(), teacher_vllm_args=a.teacher_vllm_args.split(),
            teacher_vllm_port=a.teacher_vllm_port, teacher_k=a.teacher_k, cache_args=a.cache_args.split())
    except ValueError as e:
        p.error(str(e))
    return cfg, a.dry_run


def main(argv: list[str] | None = None) -> int:
    cfg, dry_run = parse_args(argv)
    try:
        ids = submit(cfg, dry_run)
    except ValueError as e:
        print(f"nemo_run_paced.py: {e}", file=sys.stderr)
        return 2
    for stage, job_id in ids.items():
        print(f"{stage:<10} {job_id}")
    if ids:
        print(f"run directory: {cfg.run_dir}")
        print(f"follow it with: {Path(__file__).parent / 'paced_two_stage.sh'} status {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
