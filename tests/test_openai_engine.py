"""The `openai` engine over several completions servers: bounded concurrency, spreading, a replica
killed mid-job (its requests retried elsewhere, nothing counted twice), reloads reaching every replica.

The servers are real processes on loopback (tests/openai_toy_server.py) speaking the completions
subset `vllm serve` speaks, with completions that are a known function of (weights, prompt, seed,
index); `make test-vllm` runs the same engine against real `vllm serve` replicas.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from openai_toy_server import EOS, completion

from nemo_paced.problems import Problem
from nemo_paced.rollout.engines import SamplingParams, create_engine
from nemo_paced.tasks.tokenizer import char_tokenizer

TESTS = Path(__file__).parent
pytestmark = pytest.mark.timeout(120)


class ToyServer:
    def __init__(self, root: Path, name: str, delay: float = 0.0, port: int = 0) -> None:
        port_file = root / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.process = subprocess.Popen([sys.executable, str(TESTS / "openai_toy_server.py"), "--port-file",
                                         str(port_file), "--delay", str(delay), "--port", str(port)])
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert self.process.poll() is None and time.monotonic() < deadline, "toy server did not start"
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats").json()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(name, delay=0.0, port=0):
        started.append(ToyServer(tmp_path, name, delay, port))
        return started[-1]

    yield start
    for server in started:
        if server.process.poll() is None:
            server.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    char_tokenizer("0123456789+-.=").save_pretrained(path)
    return str(path)


PROMPTS = [f"{i}+{i * 7 % 10}=" for i in range(40)]


def expected_tokens(engine, prompt, weights, params):
    ids = engine.tokenizer(prompt)["input_ids"]
    return [completion(weights, ids, params.seed, j, params.max_tokens) for j in range(params.n)]


def check(engine, generations, prompts, weights, params):
    assert len(generations) == len(prompts)
    for prompt, generation in zip(prompts, generations):
        assert [s.token_ids for s in generation.samples] == expected_tokens(engine, prompt, weights, params)
        for sample in generation.samples:
            assert sample.finish_reason == ("stop" if sample.token_ids[-1] == EOS else "length")


def test_requests_spread_over_replicas_within_the_in_flight_bound(servers, model_dir):
    a, b = servers("a", delay=0.05), servers("b", delay=0.05)
    engine = create_engine("openai", model_dir, url=f"{a.url},{b.url}", max_in_flight=4)
    params = SamplingParams(n=3, max_tokens=5, seed=7)
    check(engine, engine.generate(PROMPTS, params), PROMPTS, "start", params)
    stats = [a.stats(), b.stats()]
    assert sum(s["completions"] for s in stats) == len(PROMPTS)  # one request per prompt, none repeated
    assert all(s["completions"] >= 10 for s in stats)  # least-loaded choice uses both
    assert all(s["peak_in_flight"] <= 4 for s in stats)
    assert sum(s["peak_in_flight"] for s in stats) >= 3  # requests really overlap
    assert engine.retried == 0
    engine.close()


def test_replica_killed_mid_generate_is_retried_elsewhere(servers, model_dir):
    a, b = servers("a", delay=2.0), servers("b", delay=0.02)
    engine = create_engine("openai", model_dir, url=[a.url, b.url], max_in_flight=8, cooldown=60)
    params = SamplingParams(n=4, max_tokens=6, seed=1)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=engine.generate(PROMPTS, params)))
    thread.start()
    deadline = time.monotonic() + 30
    while (stats := a.stats())["in_flight"] < 1:  # each request takes 2 s on a: time enough to kill it
        assert thread.is_alive() and time.monotonic() < deadline, "replica a never received a request"
        time.sleep(0.01)
    a_done = stats["completions"]
    a.kill()  # with a request in flight on it, whatever the machine's load
    thread.join(60)
    check(engine, result["out"], PROMPTS, "start", params)
    assert engine.retried >= 1
    # b served every prompt a did not finish, once: a finished at least a_done, at most 8 more were in flight
    assert len(PROMPTS) - a_done - 8 <= b.stats()["completions"] <= len(PROMPTS) - a_done
    assert engine.replicas[0].failures >= 1 and engine.replicas[1].failures == 0
    engine.close()


def test_estimation_job_survives_a_killed_replica_without_double_counting(servers, model_dir, tmp_path):
    """The service over two replicas, one killed mid-job: every problem ends with exactly K trials, the
    successes are those of the completions recomputed, and the service counts K rollouts per problem."""
    from nemo_paced.rollout.service import RolloutService, ServiceConfig
    from nemo_paced.rollout.verifiers import resolve

    a, b = servers("a", delay=0.2), servers("b", delay=0.02)
    engine = create_engine("openai", model_dir, url=[a.url, b.url], max_in_flight=6, cooldown=60)
    problems = [Problem(f"p{i}", prompt, "0123") for i, prompt in enumerate(PROMPTS)]
    config = ServiceConfig(k=4, max_tokens=4, template="raw", batch_problems=8, seed=3)
    service = RolloutService(engine, problems, resolve("rollout_toys:first_char_in"), tmp_path / "state", config)
    service.start()
    try:
        job = service.submit()
        while a.stats()["completions"] < 2:
            time.sleep(0.01)
        a.kill()
        deadline = time.monotonic() + 60
        while service.job(job.id).status not in ("done", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert service.job(job.id).status == "done", service.job(job.id).error
    finally:
        service.stop()
    params = SamplingParams(n=4, max_tokens=4, seed=3)
    for problem in problems:
        record = service.table[problem.id]
        texts = [engine.tokenizer.decode(t, skip_special_tokens=True)
                 for t in expected_tokens(engine, problem.prompt, "start", params)]
        assert record.trials == 4
        assert record.successes == sum(bool(t) and t[0] in "0123" for t in texts)
    assert service.rollouts == 4 * len(problems)
    assert engine.retried >= 1
    engine.close()


def test_reload_reaches_live_replicas_and_a_returning_one_catches_up(servers, model_dir):
    a, b = servers("a"), servers("b")
    engine = create_engine("openai", model_dir, url=[a.url, b.url], cooldown=0.3)
    port = a.port
    a.kill()
    engine.load_weights("ckpt-2")  # a is down: b reloads, a is marked to catch up
    assert engine.checkpoint == "ckpt-2" and b.stats()["weights"] == "ckpt-2"
    a = servers("a2", port=port)  # back on its address, with its start-up weights
    assert a.stats()["weights"] == "start"
    time.sleep(0.4)  # past its rest
    params = SamplingParams(n=2, max_tokens=5, seed=0)
    check(engine, engine.generate(PROMPTS, params), PROMPTS, "ckpt-2", params)
    assert a.stats()["weights"] == "ckpt-2" and a.stats()["completions"] > 0
    engine.close()


def test_no_replica_left_fails_with_the_servers_named(servers, model_dir):
    a = servers("a")
    engine = create_engine("openai", model_dir, url=a.url, retries=1, cooldown=0.1)
    a.kill()
    with pytest.raises(ConnectionError, match=a.url):
        engine.generate(PROMPTS[:2], SamplingParams(n=1, max_tokens=2))
    engine.close()


def test_bad_settings_are_refused(model_dir):
    with pytest.raises(ValueError, match="url"):
        create_engine("openai", model_dir, url=" , ")
    with pytest.raises(ValueError, match="max_in_flight"):
        create_engine("openai", model_dir, url="http://127.0.0.1:9", max_in_flight=0)
