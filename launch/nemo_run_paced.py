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

    @property
    def self_distillation(self) -> bool:
        """The student is its own teacher (teacher self, self:current or self:initial)."""
        return is_self_teacher(self.teacher)

    def __post_init__(self) -> None:
        if self.teacher.startswith("self:") and not self.self_distillation:
            raise ValueError(f"the self-teacher is self, self:current or self:initial; got {self.teacher!r}")
        if self.rollout_gpus is None:
            self.rollout_gpus = self.aux_gpus
        for name in ("k", "nodes", "signal_seconds", "rollout_nodes", "rollout_tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "aux_gpus", "max_requeues", "rollout_gpus"):
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
        files = ["--init", init, "--teacher", cfg.teacher, "--problems", cfg.problems,
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
    # The service needs a while to load its model before it publishes its address.
    wait = (f"for _ in $(seq {max(cfg.service_wait // 2, 1)}); do [ -s {q(run)}/rollouts.addr ] && break; "
            "sleep 2; done\n")
    return {
        "references": paced("make-references", "--engine", cfg.engine, "--teacher", cfg.teacher, "--problems", cfg.problems,
                            "--out", f"{run}/references.jsonl", *cfg.reference_args),
        "rollouts": deployment + "\n".join([
            f"echo $SLURM_JOB_ID > {q(run)}/rollouts.jobid", f"rm -f {q(run)}/rollouts.addr",
            f"host={q(cfg.service_host)}" if cfg.service_host else "host=$(hostname -I | awk '{print $1}')",
            f"(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {q(run)}/rollouts.token)",
            paced("serve-rollouts", *engine, "--model", cfg.student, "--problems", cfg.problems,
                  "--k", str(cfg.k), "--state-dir", f"{run}/rollouts", "--port", "0", "--token-file",
                  f"{run}/rollouts.token", "--address-file", f"{run}/rollouts.addr", "--weights-root", run,
                  *cfg.service_args) + ' --host "${host:-127.0.0.1}"']),
        "estimate0": wait + paced(*estimate, "--wait"),
        "stage1": train("stage1", "fkl", cfg.student),
        "estimate1": wait + paced(*estimate, "--checkpoint", f"{run}/stage1/final", "--wait"),
        "stage2": train("stage2", "rkl", f"{run}/stage1/final"),
        "self": train("self", "rkl", cfg.student),
        "eval": paced("eval", "--engine", cfg.eval_engine, "--model",
                      f"{run}/{'self' if cfg.self_distillation else 'stage2'}/final", "--benchmarks",
                      *cfg.benchmarks, "--out", f"{run}/eval.json", *cfg.eval_args),
        "finish": f"scancel $(cat {q(run)}/rollouts.jobid)",
    }


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


def chain(cfg: ChainConfig) -> dict[str, tuple[str, str, list[str]]]:
    return SELF_CHAIN if cfg.self_distillation else CHAIN


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
    }[kind]
    ex = run.SlurmExecutor(
        account=cfg.account, partition=cfg.partition, qos=cfg.qos, nodes=nodes, ntasks_per_node=tasks,
        gpus_per_node=gpus or None, cpus_per_task=cfg.cpus_per_task, time=time,
        container_image=cfg.image, container_mounts=[f"{cfg.run_dir}:{cfg.run_dir}", *cfg.mounts],
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
            image=a.image, mounts=[m for m in a.mounts.split(",") if m])
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
