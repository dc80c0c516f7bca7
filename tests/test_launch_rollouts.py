"""The rollout service job (launch/jobs/rollouts.sbatch) on several GPUs: it starts one vLLM
data-parallel deployment over the job's nodes and points the service's openai engine at it.

The job script runs for real under bash, with `srun`, `scontrol` and `nemo-paced` replaced by
stubs on PATH that record their arguments (no SLURM or GPU here; the chain on a real one-node
SLURM is tests/test_launch_slurm.py, and `make test-vllm` drives real `vllm serve` replicas).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from launch_stubs import JOBS, STUB, install_stubs, nemo_run_launcher, option, run_on_two_nodes, scontrol


def run_job(tmp_path: Path, **settings: str) -> list[list[str]]:
    run = tmp_path / "run"
    (run / "launch").mkdir(parents=True)
    for script in ("common.sh", "rollouts.sbatch"):
        shutil.copy(JOBS / script, run / "launch" / script)
    env_vars = {"PACED_RUN_DIR": str(run), "PACED_STUDENT": "/m/student", "PACED_PROBLEMS": "/d/p.jsonl",
                "PACED_K": "8", "PACED_ENGINE": "vllm", "PACED_SERVICE_HOST": "10.0.0.7",
                "PACED_SERVICE_WAIT": "900", **settings}
    (run / "chain.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env_vars.items()))
    bin_dir = tmp_path / "bin"
    install_stubs(bin_dir, {"srun": STUB, "scontrol": scontrol("gpu-a", "gpu-b")})
    calls = tmp_path / "calls"
    result = subprocess.run(["bash", str(run / "launch" / "rollouts.sbatch"), str(run), "rollouts"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
                                 "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_ID": "42"})
    assert result.returncode == 0, result.stderr
    return [line.split() for line in calls.read_text().splitlines()]


def test_two_nodes_of_four_gpus_run_one_data_parallel_deployment_behind_the_service(tmp_path):
    calls = run_job(tmp_path, PACED_ROLLOUT_NODES="2", PACED_ROLLOUT_GPUS="4", PACED_ROLLOUT_TP="2",
                    PACED_VLLM_ARGS="--max-model-len 9216", PACED_VLLM_PORT="8123")
    vllm = sorted((c for c in calls if "vllm" in c), key=lambda c: option(c, "--nodelist"))
    service = [c for c in calls if "serve-rollouts" in c]
    assert len(vllm) == 2 and len(service) == 1
    head, other = vllm
    for call, node in ((head, "gpu-a"), (other, "gpu-b")):
        assert option(call, "--nodelist") == node and option(call, "--gpus-per-node") == "4"
        assert "VLLM_SERVER_DEV_MODE=1" in call and "--overlap" in call
        assert call[call.index("serve") + 1] == "/m/student"
        assert option(call, "--data-parallel-size") == "4"  # 2 nodes x 4 GPUs / TP 2
        assert option(call, "--data-parallel-size-local") == "2" and option(call, "--tensor-parallel-size") == "2"
        assert option(call, "--data-parallel-address") == "10.0.0.7"
        assert option(call, "--max-model-len") == "9216"
    assert option(head, "--port") == "8123" and option(head, "--host") == "127.0.0.1" and "--headless" not in head
    assert "--headless" in other and option(other, "--data-parallel-start-rank") == "2"
    call = service[0]
    assert option(call, "--engine") == "openai" and option(call, "--openai-url") == "http://127.0.0.1:8123"
    assert option(call, "--nodelist") == "gpu-a" and option(call, "--max-in-flight") == "256"
    assert option(call, "--openai-startup-timeout") == "900" and option(call, "--host") == "10.0.0.7"


def test_one_gpu_keeps_the_in_process_engine(tmp_path):
    calls = run_job(tmp_path, PACED_ROLLOUT_NODES="1", PACED_ROLLOUT_GPUS="1")
    assert len(calls) == 1 and "vllm" not in calls[0][:calls[0].index("serve-rollouts")]
    assert option(calls[0], "--engine") == "vllm" and "--openai-url" not in calls[0]


def test_nemo_run_rollouts_task_starts_the_same_deployment_on_every_node(tmp_path):
    """launch/nemo_run_paced.py: the task script runs once per node; node 0 serves the API and the
    service, the others run headless engines."""
    module = nemo_run_launcher()
    cfg, _ = module.parse_args(["tiny_cpu", "--problems", "/d/p.jsonl", "--teacher", "/m/t", "--student", "/m/s",
                                "--benchmarks", "/d/b.jsonl", "--run-dir", str(tmp_path / "run"),
                                "--rollout-nodes", "2", "--rollout-gpus", "2", "--service-host", "10.0.0.7"])
    script = module.commands(cfg)["rollouts"]
    (tmp_path / "run").mkdir()
    head, other = run_on_two_nodes(script, tmp_path)
    vllm_head = next(c for c in head if c[0] == "vllm")
    service = next(c for c in head if c[0] == "nemo-paced")
    assert [c[0] for c in other] == ["vllm"] and "--headless" in other[0]
    assert option(other[0], "--data-parallel-start-rank") == "2"
    for call in (vllm_head, other[0]):
        assert option(call, "--data-parallel-size") == "4" and option(call, "--data-parallel-size-local") == "2"
        assert option(call, "--data-parallel-address") == "10.0.0.1"
    assert option(vllm_head, "--port") == "8100" and "--headless" not in vllm_head
    assert option(service, "--engine") == "openai" and option(service, "--openai-url") == "http://127.0.0.1:8100"
    assert module.ChainConfig.__dataclass_fields__["rollout_nodes"].default == 1
