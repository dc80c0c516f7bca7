"""The frontier chain's job scripts (launch/jobs/teacher.sbatch, cache.sbatch, train.sbatch, finish.sbatch)
under bash, with `srun`, `scontrol`, `scancel` and `curl` replaced by stubs on PATH that record their
arguments: the teacher job's multi-node vLLM deployment needs GPUs this machine lacks. The whole chain with
the hf teacher on a real one-node SLURM is tests/test_launch_slurm.py; the NeMo-Run launcher's teacher task
runs here under the same stubs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from launch_stubs import JOBS, REPO, STUB, install_stubs, nemo_run_launcher, option, run_on_two_nodes, scontrol

CURL = """#!/usr/bin/env bash
printf '%s\\n' "curl $*" >> "$CALLS"
echo 'nemo_paced_teacher_tokens_total 12'
"""


def run_job(tmp_path: Path, script: str, stage: str, *args: str, **settings: str) -> list[list[str]]:
    run = tmp_path / "run"
    (run / "launch").mkdir(parents=True, exist_ok=True)
    for name in ("common.sh", script):
        shutil.copy(JOBS / name, run / "launch" / name)
    env_vars = {"PACED_RUN_DIR": str(run), "PACED_RECIPE": "tiny_cpu", "PACED_STUDENT": "/m/student",
                "PACED_TEACHER": "/m/teacher", "PACED_PROBLEMS": "/d/p.jsonl", "PACED_STAGE_SPLIT": "0.5",
                "PACED_TEACHER_ENGINE": "vllm", "PACED_TEACHER_K": "64", "PACED_SERVICE_WAIT": "5", **settings}
    (run / "chain.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env_vars.items()))
    bin_dir = tmp_path / "bin"
    hosts = scontrol("gpu-a", "gpu-b", "gpu-c")
    install_stubs(bin_dir, {"srun": STUB, "scancel": STUB, "curl": CURL, "scontrol": hosts,
                            "squeue": "#!/usr/bin/env bash\necho RUNNING\n"})
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    result = subprocess.run(["bash", str(run / "launch" / script), str(run), stage, *args],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
                                 "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_JOB_ID": "42"})
    assert result.returncode == 0, result.stderr
    return [line.split() for line in calls.read_text().splitlines()]


def this_host() -> str:
    return subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]


def test_three_teacher_nodes_run_one_pipeline_parallel_vllm_deployment_behind_the_service(tmp_path):
    calls = run_job(tmp_path, "teacher.sbatch", "teacher", PACED_TEACHER_NODES="3", PACED_TEACHER_GPUS="8",
                    PACED_TEACHER_VLLM_ARGS="--max-model-len 16384", PACED_TEACHER_VLLM_PORT="8222",
                    PACED_TEACHER_ARGS="--max-k 64", PACED_TEACHER_IMAGE="vllm+teacher.sqsh", PACED_IMAGE="nemo.sqsh")
    vllm = sorted((c for c in calls if "vllm" in c), key=lambda c: option(c, "--nodelist"))
    service = [c for c in calls if "serve-teacher" in c]
    assert len(vllm) == 3 and len(service) == 1
    for rank, (call, node) in enumerate(zip(vllm, ("gpu-a", "gpu-b", "gpu-c"))):
        assert option(call, "--nodelist") == node and option(call, "--gpus-per-node") == "8"
        assert call[call.index("serve") + 1] == "/m/teacher" and option(call, "--container-image") == "vllm+teacher.sqsh"
        assert option(call, "--tensor-parallel-size") == "8" and option(call, "--pipeline-parallel-size") == "3"
        assert option(call, "--nnodes") == "3" and option(call, "--node-rank") == str(rank)
        assert option(call, "--master-addr") == this_host() and option(call, "--max-model-len") == "16384"
        assert option(call, "--max-logprobs") == "256"  # vLLM's default, 20, would refuse k = 64
        assert ("--headless" in call) == (rank > 0)
    assert option(vllm[0], "--port") == "8222" and option(vllm[0], "--host") == "127.0.0.1"
    call = service[0]
    assert option(call, "--engine") == "openai" and option(call, "--openai-url") == "http://127.0.0.1:8222"
    assert option(call, "--nodelist") == "gpu-a" and option(call, "--teacher") == "/m/teacher"
    assert option(call, "--container-image") == "vllm+teacher.sqsh" and option(call, "--max-k") == "64"
    run = tmp_path / "run"
    assert option(call, "--address-file") == f"{run}/teacher.addr" and option(call, "--host") == this_host()
    token = run / "teacher.token"
    assert option(call, "--token-file") == str(token) and len(token.read_text()) == 64
    assert token.stat().st_mode & 0o777 == 0o600


def test_one_teacher_node_runs_vllm_in_the_service_tensor_parallel_over_its_gpus(tmp_path):
    calls = run_job(tmp_path, "teacher.sbatch", "teacher", PACED_TEACHER_NODES="1", PACED_TEACHER_GPUS="8")
    assert len(calls) == 1 and "serve" not in calls[0][:calls[0].index("serve-teacher")]  # no vllm serve first
    assert option(calls[0], "--engine") == "vllm" and option(calls[0], "--tensor-parallel-size") == "8"
    hf = run_job(tmp_path / "hf", "teacher.sbatch", "teacher", PACED_TEACHER_ENGINE="hf", PACED_TEACHER_GPUS="0")
    assert option(hf[0], "--engine") == "hf" and "--tensor-parallel-size" not in hf[0]


def test_training_jobs_get_the_cache_or_the_service_and_never_the_teacher(tmp_path):
    run = tmp_path / "run"
    for objective, given, absent in (("fkl", "--teacher-cache", "--teacher-service"),
                                     ("rkl", "--teacher-service", "--teacher-cache")):
        calls = run_job(tmp_path, "train.sbatch", f"stage-{objective}", objective, PACED_GPUS_PER_NODE="0")
        train = calls[-1][calls[-1].index("nemo-paced"):]
        assert train[:5] == ["nemo-paced", "train", "--recipe", "tiny_cpu", "--stage"] and train[5] == objective
        assert "--teacher" not in train and absent not in train
        assert option(train, given) == (f"{run}/teacher-cache" if objective == "fkl" else f"{run}/teacher.addr")
    classic = run_job(tmp_path, "train.sbatch", "stage1", "fkl", PACED_TEACHER_ENGINE="")
    assert option(classic[-1], "--teacher") == "/m/teacher" and "--teacher-cache" not in classic[-1]


def test_the_cache_job_scores_the_references_through_the_service(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "teacher.addr").write_text('{"url": "http://10.0.0.9:4242"}')
    calls = run_job(tmp_path, "cache.sbatch", "cache", "41", PACED_TEACHER_K="16", PACED_CACHE_ARGS="--template raw")
    call = calls[0][calls[0].index("nemo-paced"):]
    assert call[1] == "teacher-cache" and option(call, "--service") == f"{run}/teacher.addr"
    assert option(call, "--teacher") == "/m/teacher" and option(call, "--references") == f"{run}/references.jsonl"
    assert option(call, "--passrates") == f"{run}/rollouts/passrates.jsonl" and option(call, "--k") == "16"
    assert option(call, "--out") == f"{run}/teacher-cache" and option(call, "--template") == "raw"


def test_the_cache_job_fails_when_the_teacher_service_ended_without_an_address(tmp_path):
    run = tmp_path / "run"
    (run / "launch").mkdir(parents=True)
    for name in ("common.sh", "cache.sbatch"):
        shutil.copy(JOBS / name, run / "launch" / name)
    (run / "chain.env").write_text(f"PACED_RUN_DIR={run}\nPACED_SERVICE_WAIT=5\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/usr/bin/env bash\nexit 0\n")  # the job has left the queue
    (bin_dir / "squeue").chmod(0o755)
    result = subprocess.run(["bash", str(run / "launch" / "cache.sbatch"), str(run), "cache", "41"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 1
    assert f"the teacher service (job 41) is no longer queued and never published {run}/teacher.addr" in result.stderr


def test_finish_saves_the_teacher_metrics_and_stops_both_services(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "teacher.addr").write_text('{"url": "http://10.0.0.9:4242", "host": "10.0.0.9", "port": 4242}')
    (run / "teacher.token").write_text("s3cret")
    calls = run_job(tmp_path, "finish.sbatch", "finish", "11", "12")
    curl = next(c for c in calls if c[0] == "curl")
    assert "http://10.0.0.9:4242/metrics" in curl and "Bearer s3cret" in " ".join(curl)
    assert (run / "teacher.metrics").read_text() == "nemo_paced_teacher_tokens_total 12\n"
    assert ["scancel", "11", "12"] in calls


def test_nemo_run_teacher_task_starts_the_same_deployment_on_every_node(tmp_path):
    module = nemo_run_launcher()
    run = tmp_path / "run"
    cfg, _ = module.parse_args(["tiny_cpu", "--problems", "/d/p.jsonl", "--teacher", "/m/t", "--student", "/m/s",
                                "--benchmarks", "/d/b.jsonl", "--run-dir", str(run), "--teacher-engine", "vllm",
                                "--teacher-nodes", "2", "--teacher-gpus", "4", "--teacher-args", "--max-k 32"])
    script = module.commands(cfg)["teacher"]
    run.mkdir()
    head, other = run_on_two_nodes(script, tmp_path)
    vllm_head = next(c for c in head if c[0] == "vllm")
    service = next(c for c in head if c[0] == "nemo-paced")
    assert [c[0] for c in other] == ["vllm"] and "--headless" in other[0]
    for rank, call in enumerate((vllm_head, other[0])):
        assert option(call, "--tensor-parallel-size") == "4" and option(call, "--pipeline-parallel-size") == "2"
        assert option(call, "--nnodes") == "2" and option(call, "--node-rank") == str(rank)
        assert option(call, "--master-addr") == "10.0.0.1" and option(call, "--max-logprobs") == "256"
    assert option(vllm_head, "--port") == "8200" and "--headless" not in vllm_head
    assert service[1] == "serve-teacher" and option(service, "--engine") == "openai"
    assert option(service, "--openai-url") == "http://127.0.0.1:8200" and option(service, "--max-k") == "32"
    assert (run / "teacher.jobid").read_text().strip() == "7"


def test_references_go_through_the_teachers_own_server_with_the_openai_engine(tmp_path):
    served = run_job(tmp_path, "references.sbatch", "references", PACED_ENGINE="vllm", PACED_TEACHER_ENGINE="openai",
                     PACED_TEACHER_ARGS="--max-k 32 --openai-url http://10.0.0.5:8000 --openai-key-env TEACHER_KEY",
                     PACED_REFERENCE_ARGS="--temperature 0")
    call = served[0][served[0].index("nemo-paced"):]
    assert call[:6] == ["nemo-paced", "make-references", "--engine", "openai", "--openai-url", "http://10.0.0.5:8000"]
    assert option(call, "--openai-key-env") == "TEACHER_KEY" and "--max-k" not in call
    assert option(call, "--teacher") == "/m/teacher" and option(call, "--temperature") == "0"
    in_process = run_job(tmp_path / "vllm", "references.sbatch", "references", PACED_ENGINE="vllm",
                         PACED_TEACHER_IMAGE="teacher.sqsh")
    assert option(in_process[0], "--engine") == "vllm" and "--openai-url" not in in_process[0]
    assert option(in_process[0], "--container-image") == "teacher.sqsh"  # the teacher's image


def test_nemo_run_references_use_the_same_server_and_no_gpus():
    module = nemo_run_launcher()
    args = ["tiny_cpu", "--problems", "/d/p.jsonl", "--teacher", "/m/t", "--student", "/m/s", "--benchmarks",
            "/d/b.jsonl", "--run-dir", "/r", "--teacher-gpus", "8"]
    cfg, _ = module.parse_args([*args, "--teacher-engine", "openai", "--teacher-args",
                                "--max-k 32 --openai-url http://10.0.0.5:8000"])
    assert module.commands(cfg)["references"].startswith(
        "exec nemo-paced make-references --engine openai --openai-url http://10.0.0.5:8000 --teacher /m/t")
    assert module.executor(cfg, "references").gpus_per_node is None
    out = subprocess.run(["bash", str(REPO / "launch" / "paced_two_stage.sh"), *args, "--teacher-engine", "openai",
                          "--teacher-args", "--openai-url http://10.0.0.5:8000", "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    references = next(line for line in out.splitlines() if line.startswith("JOB_references="))
    assert "--gpus-per-node" not in references
    cfg, _ = module.parse_args([*args, "--teacher-engine", "vllm"])
    assert module.executor(cfg, "references").gpus_per_node == 8
