"""The rollout service for real: `nemo-paced serve-rollouts` in a subprocess on 127.0.0.1 with a tiny
random GPT-2, talked to through RolloutClient and raw HTTP.

The toy verifier (`rollout_toys.first_char_in`) makes each problem's pass rate computable exactly
from one forward pass, so estimates are checked against the truth, not against themselves.
"""

import json
import math
import os
import shutil
import signal
import time
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from rollout_toys import (TOY_PROBLEMS, Server, exact_pass_rate, first_char_in, save_broken_checkpoints,
                          save_tiny_model, teacher_forced_logprobs, toy_problems)

from nemo_paced.passrates import PassRateTable
from nemo_paced.rollout.client import RequestRejected, RolloutClient, ServiceUnavailable

K = 48


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    models = {"a": save_tiny_model(root / "model-a", seed=0), "b": save_tiny_model(root / "model-b", seed=1)}
    with open(root / "problems.jsonl", "w") as f:
        for problem_id, prompt, answer in TOY_PROBLEMS:
            f.write(json.dumps({"id": problem_id, "prompt": prompt, "answer": answer}) + "\n")
    from transformers import AutoTokenizer

    return root, models, AutoTokenizer.from_pretrained(root / "model-a")


def serve(root: Path, state: Path, *extra: str) -> Server:
    return Server(root / "model-a", root / "problems.jsonl", state, "--verifier", "rollout_toys:first_char_in",
                  "--template", "raw", "--k", str(K), "--max-tokens", "4", "--seed", "0", "--batch-size", "256",
                  *extra)


@pytest.fixture(scope="module")
def server(workspace):
    root, _, _ = workspace
    srv = serve(root, root / "main", "--max-request-bytes", "65536")
    yield srv
    srv.stop()


def test_estimates_match_the_exact_pass_rates(server, workspace):
    root, models, tokenizer = workspace
    client = server.client()
    status = client.wait(client.estimate(), poll=0.1, timeout=300)
    assert status["status"] == "done" and status["done"] == status["total"] == len(TOY_PROBLEMS)
    assert status["checkpoints"] == [str(root / "model-a")]
    table = client.refresh_table()
    assert table.version == status["table_version"] >= 1
    for problem_id, prompt, answer in TOY_PROBLEMS:
        record = table[problem_id]
        p = exact_pass_rate(models["a"], tokenizer, prompt, answer)
        assert record.trials == K and record.checkpoint == str(root / "model-a")
        # within 4.5 binomial standard deviations of the truth (the seed makes the run reproducible)
        assert abs(record.pass_rate - p) <= 4.5 * math.sqrt(p * (1 - p) / K) + 1e-9, (problem_id, record, p)
    assert table["none"].successes == 0  # its answer has no character the model can produce
    saved = PassRateTable.load(root / "main" / "passrates.jsonl")
    assert saved.version == table.version and saved.records() == table.records()
    assert client.staleness() < 60


def test_on_policy_logprobs_match_teacher_forcing(server, workspace):
    root, models, _ = workspace
    client = server.client()
    version = client.health()["table_version"]
    batch = client.sample(["digits", "ops", "all"], n=3, max_tokens=4, seed=1, fold=False)
    assert batch.checkpoint == str(root / "model-a")
    assert [p.problem_id for p in batch.problems] == ["digits", "ops", "all"]
    answers = {problem_id: answer for problem_id, _, answer in TOY_PROBLEMS}
    worst = 0.0
    for problem in batch.problems:
        assert len(problem.samples) == 3
        for sample in problem.samples:
            assert len(sample.token_ids) == len(sample.logprobs) >= 1
            assert sample.finish_reason == ("stop" if sample.token_ids[-1] == 1 else "length")
            assert sample.score == int(first_char_in(sample.text, answers[problem.problem_id]))
            expected = teacher_forced_logprobs(models["a"], problem.prompt_token_ids, sample.token_ids)
            worst = max(worst, (expected - torch.tensor(sample.logprobs)).abs().max().item())
    assert worst < 1e-4
    assert client.health()["table_version"] == version  # fold=False leaves the table alone


def test_on_policy_scores_fold_in_once_k_have_arrived(server):
    client = server.client()
    before = client.refresh_table().version
    first = client.sample(["mid"], n=K // 2, max_tokens=1)
    assert client.refresh_table().version == before  # half of K pooled, not folded
    second = client.sample(["mid"], n=K // 2, max_tokens=1)
    table = client.refresh_table()
    assert table.version == before + 1
    record = table["mid"]
    assert record.trials == K
    assert record.successes == first.problems[0].successes + second.problems[0].successes


def test_concurrent_clients(server):
    errors, versions = [], []

    def sampler(seed):
        with server.client() as client:
            for _ in range(3):
                batch = client.sample(["digits", "low"], n=2, max_tokens=2, seed=seed, fold=False)
                assert [len(p.samples) for p in batch.problems] == [2, 2]

    def estimator():
        with server.client() as client:
            assert client.wait(client.estimate(["ops", "all"], k=8), poll=0.05, timeout=300)["done"] == 2

    def reader():
        with server.client() as client:
            for _ in range(20):
                versions.append(client.health()["table_version"])
                client.refresh_table()

    def guarded(fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=a) for a in
               [(sampler, 1), (sampler, 2), (estimator,), (reader,), (estimator,)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert versions == sorted(versions)
    table = server.client().refresh_table()
    assert table["ops"].trials == 8 and table["all"].trials == 8


def test_bad_requests_get_4xx_naming_the_field(server, workspace, tmp_path):
    client = server.client()
    cases = [
        (lambda: client.estimate(k=1000), "field 'k'"),
        (lambda: client.estimate(["digits", "nope"]), "'nope'"),
        (lambda: client.sample(["digits"], n=0), "field 'n'"),
        (lambda: client.sample(["digits"], temperature=-1.0), "field 'temperature'"),
        (lambda: client.sample(["digits"], max_tokens=5000), "field 'max_tokens'"),
        (lambda: client.sample([]), "field 'ids'"),
        (lambda: client.load_weights("/nonexistent/checkpoint"), "field 'path'"),
        (lambda: client.load_weights(tmp_path), "field 'path': cannot load weights"),  # a directory, no model
        (lambda: client.job("nope"), "field 'job_id'"),
        (lambda: client.table_since(-1), "field 'since'"),
    ]
    for call, needle in cases:
        with pytest.raises(RequestRejected) as error:
            call()
        assert 400 <= error.value.status < 500 and needle in str(error.value), str(error.value)
    with httpx.Client(base_url=server.url) as http:
        assert http.post("/sample", json={"ids": ["digits"], "tempreature": 0.5}).json()["detail"][0]["loc"] == [
            "body", "tempreature"]
        assert http.post("/estimate", content=b"{not json", headers={"content-type": "application/json"}
                         ).status_code == 422
        assert http.post("/estimate", json={"ids": ["x" * 100] * 1000}).status_code == 413
        chunked = http.post("/estimate", content=iter([b'{"ids": ["', b"y" * 70000, b'"]}']))
        assert chunked.status_code == 413
    assert client.health()["checkpoint"] == str(workspace[0] / "model-a")  # still serving the old weights


def _raw(server, method: str, path: str, body: bytes, **headers) -> httpx.Response:
    return httpx.request(method, server.url + path, content=body,
                         headers={"content-type": "application/json", **headers}, timeout=60)


HOSTILE = [  # (path, raw JSON body, the location the 422 must name)
    ("/estimate", b'{"k": NaN}', ["body", "k"]),
    ("/estimate", b'{"k": Infinity}', ["body", "k"]),
    ("/estimate", b'{"k": 1e400}', ["body", "k"]),
    ("/estimate", b'{"ids": null, "unknown_field": -Infinity}', ["body", "unknown_field"]),
    ("/sample", b'{"ids": ["digits"], "temperature": NaN}', ["body", "temperature"]),
    ("/sample", b'{"ids": ["digits"], "n": 1e400}', ["body", "n"]),
    ("/sample", b'{"ids": ["digits"], "extra": {"deep": [1, 2, NaN]}}', ["body", "extra", "deep", 2]),
    ("/weights", b'{"path": "x", "step": Infinity}', ["body", "step"]),
    ("/estimate", b'{"k": true}', ["body", "k"]),  # a bool is not K = 1
    ("/estimate", b'{"k": 8.0}', ["body", "k"]),
    ("/estimate", b'{"ids": ["digits", 7]}', ["body", "ids", 1]),
    ("/sample", b'{"ids": ["digits"], "n": "2"}', ["body", "n"]),  # a string is not 2
    ("/sample", b'{"ids": ["digits"], "fold": "yes"}', ["body", "fold"]),
    ("/sample", b'{"ids": ["digits"], "max_tokens": false}', ["body", "max_tokens"]),
    ("/sample", b'{"ids": ["digits"], "temperature": 1e-300}', ["body", "temperature"]),
    ("/sample", b'{"ids": ["digits"], "temperature": 0.009}', ["body", "temperature"]),
    ("/sample", b'{"ids": ["digits"], "seed": 18446744073709551616}', ["body", "seed"]),  # 2**64
    ("/sample", b'{"ids": ["digits"], "seed": -9223372036854775809}', ["body", "seed"]),  # below -2**63
    ("/sample", b'{"ids": ["digits"], "seed": -1}', ["body", "seed"]),
    ("/weights", b'{"path": "x", "step": true}', ["body", "step"]),
    ("/weights", b'{"path": "a\\u0000b"}', ["body", "path"]),  # os calls raise on a NUL byte
    ("/estimate", b'{"k": ' + b"9" * 5000 + b"}", ["body"]),  # beyond Python's integer-string limit
    ("/estimate", b'{"k": 8', ["body"]),
]


@pytest.mark.parametrize("path,body,loc", HOSTILE, ids=[f"{p}:{b[:40].decode()}" for p, b, _ in HOSTILE])
def test_hostile_json_gets_422_naming_the_field(server, path, body, loc):
    response = _raw(server, "POST", path, body)
    assert response.status_code == 422, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert detail[0]["loc"][:len(loc)] == loc and detail[0]["msg"], detail
    assert _raw(server, "GET", "/health", b"").json()["status"] == "ok"


def test_strict_types_leave_the_estimates_alone(server):
    """`"k": true` once overwrote K = 8 estimates with a single-sample one in replace mode."""
    client = server.client()
    client.wait(client.estimate(["low"], k=8), poll=0.05, timeout=300)
    before = client.refresh_table()
    assert before["low"].trials == 8
    assert _raw(server, "POST", "/estimate", b'{"ids": ["low"], "k": true}').status_code == 422
    assert client.health()["queue"] == 0
    after = client.refresh_table()
    assert after.version == before.version and after["low"] == before["low"]


def test_documented_sampling_bounds_are_served(server):
    """The smallest temperature and the seed bounds that are accepted really generate."""
    client = server.client()
    for temperature, seed in ((0.01, 0), (0.01, 2**63 - 1), (0.0, None)):
        batch = client.sample(["digits"], n=2, max_tokens=2, temperature=temperature, seed=seed, fold=False)
        assert len(batch.problems[0].samples) == 2


def test_metrics(server):
    server.client().sample(["low"], n=2, max_tokens=1, fold=False)
    text = server.client().metrics()
    values = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert float(values["nemo_paced_rollouts_total"]) > 0
    assert float(values["nemo_paced_rollouts_per_second"]) > 0
    assert float(values["nemo_paced_table_version"]) == server.client().health()["table_version"]
    assert values["nemo_paced_queue_length"] == "0"


def test_estimate_cli_waits_and_saves_the_table(server, tmp_path):
    out = tmp_path / "table.jsonl"
    run = subprocess.run([sys.executable, "-m", "nemo_paced", "estimate", "--service", str(server.address),
                          "--ids", "low", "mid", "--k", "4", "--wait", "--poll", "0.1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "done: 2 problems" in run.stderr
    table = PassRateTable.load(out)
    assert table["low"].trials == 4 and table["mid"].trials == 4
    refused = subprocess.run([sys.executable, "-m", "nemo_paced", "estimate", "--service", server.url,
                              "--k", "999"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "field 'k'" in refused.stderr


def test_unreachable_service_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RolloutClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.01)
    with pytest.raises(ServiceUnavailable, match=f"cannot reach the rollout service at http://127.0.0.1:{port}"):
        client.health()
    run = subprocess.run([sys.executable, "-m", "nemo_paced", "estimate", "--service", f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "cannot reach" in run.stderr


def test_auth_required_off_loopback_and_checked_on_every_request(workspace, tmp_path):
    root, _, _ = workspace
    refused = subprocess.run([sys.executable, "-m", "nemo_paced", "serve-rollouts", "--model", str(root / "model-a"),
                              "--problems", str(root / "problems.jsonl"), "--state-dir", str(tmp_path / "x"),
                              "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "NEMO_PACED_ROLLOUT_TOKEN"})
    assert refused.returncode != 0 and "bearer token is required" in refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    srv = serve(root, tmp_path / "auth", "--token-file", str(token_file))
    try:
        address = json.loads(srv.address.read_text())
        assert address["token_file"] == str(token_file) and "s3cret" not in srv.address.read_text()
        assert {"url", "host", "port", "pid"} <= set(address) and address["pid"] == srv.process.pid
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Basic s3cret-token"}, {"Authorization": "Bearer"},
                        {"Authorization": "Bearers3cret-token"}):
            for method, path in (("GET", "/health"), ("GET", "/metrics"), ("GET", "/table"), ("POST", "/estimate")):
                response = httpx.request(method, srv.url + path, headers=headers, json={})
                assert response.status_code == 401, (headers, path)
        assert srv.client().health()["status"] == "ok"  # the token from the address file's token_file
        for scheme in ("bearer", "BEARER", "bEaReR"):  # the scheme is case-insensitive (RFC 7235)
            response = httpx.get(srv.url + "/health", headers={"Authorization": f"{scheme} s3cret-token"})
            assert response.status_code == 200, scheme
        with pytest.raises(RequestRejected, match="HTTP 401"):
            RolloutClient(srv.url, token="wrong", retries=0).health()
    finally:
        srv.stop()
    assert not srv.address.exists()  # a clean shutdown removes the address file


def test_restart_resumes_table_weights_and_unfinished_jobs(workspace, tmp_path):
    root, models, tokenizer = workspace
    state = tmp_path / "state"
    srv = serve(root, state, "--batch-problems", "1")
    client = srv.client()
    client.load_weights(root / "model-b", step=5)
    client.wait(client.estimate(), poll=0.05, timeout=300)
    first = client.refresh_table()
    assert {r.checkpoint for r in first.records()} == {str(root / "model-b")}
    assert {r.step for r in first.records()} == {5}
    job = client.estimate(k=K)
    assert srv.stop(signal.SIGKILL) == -signal.SIGKILL  # a crash, mid-job
    saved = PassRateTable.load(state / "passrates.jsonl")  # never a partial file
    assert saved.version >= first.version

    kept = client.refresh_table()  # the service is down: the last good table stays, and says how old it is
    assert kept.records() == first.records() and client.staleness() > 0

    srv = serve(root, state, "--batch-problems", "1")  # on a new port: the address file says which
    try:
        health = client.health()  # the same client: it re-reads the address file and follows the service
        assert client.url == srv.url
        assert health["checkpoint"] == str(root / "model-b") and health["step"] == 5
        assert health["table_version"] >= saved.version  # the resumed job may already have added a batch
        status = client.wait(job, poll=0.05, timeout=300)  # the interrupted job was queued again
        assert status["done"] == status["total"] == len(TOY_PROBLEMS)
        assert status["checkpoints"] == [str(root / "model-b")]
        table = client.refresh_table()
        # every batch not saved before the crash ran after the restart (the one in flight may run twice)
        assert saved.version < table.version <= first.version + len(TOY_PROBLEMS) + 1
        for problem_id, prompt, answer in TOY_PROBLEMS:
            p = exact_pass_rate(models["b"], tokenizer, prompt, answer)
            assert abs(table[problem_id].pass_rate - p) <= 4.5 * math.sqrt(p * (1 - p) / K) + 1e-9
    finally:
        srv.stop()


def test_weight_reloads_refuse_broken_checkpoints_and_paths_outside_the_roots(workspace, tmp_path):
    root, _, _ = workspace
    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir(), other.mkdir()
    good = shutil.copytree(root / "model-b", run / "stage1" / "final")
    broken = save_broken_checkpoints(root / "model-a", run)
    (run / "escape").symlink_to(root / "model-b", target_is_directory=True)
    srv = serve(root, tmp_path / "state", "--weights-root", str(run), "--weights-root", str(other))
    try:
        client = srv.client()
        refusals = set()
        for path in (root / "model-b", "/nonexistent/checkpoint", run / ".." / "run-not", run / "escape",
                     f"{run}/../{root.name}", tmp_path, run.parent / "run2"):
            with pytest.raises(RequestRejected) as error:
                client.load_weights(path)
            assert error.value.status == 422
            refusals.add(str(error.value))
        assert len(refusals) == 1 and "field 'path'" in refusals.pop()  # one message: nothing about what exists
        for name, (path, needle) in broken.items():
            with pytest.raises(RequestRejected) as error:
                client.load_weights(path, step=3)
            assert error.value.status == 422 and "field 'path'" in str(error.value), name
            assert needle in str(error.value), (name, str(error.value))
            health = client.health()
            assert health["status"] == "ok" and health["checkpoint"] == str(root / "model-a") and health["step"] is None
        assert client.load_weights(good, step=7) == {"checkpoint": str(good), "step": 7}
        assert client.sample(["digits"], n=2, max_tokens=2, fold=False).checkpoint == str(good)
    finally:
        srv.stop()


def test_on_policy_pool_never_mixes_weights(workspace, tmp_path):
    """Half a pool drawn by one checkpoint must not be folded with samples of the next one, nor
    survive a reload of the same path (a new training run starting from the same weights)."""
    root, _, _ = workspace
    srv = serve(root, tmp_path / "state")
    try:
        client = srv.client()
        version = client.refresh_table().version

        def half() -> int:
            return client.sample(["mid"], n=K // 2, max_tokens=1).problems[0].successes

        half()  # drawn by model-a
        client.load_weights(root / "model-b", step=1)
        half()  # drawn by model-b: with the model-a half, K scores, but from two checkpoints
        assert client.refresh_table().version == version, "scores of two checkpoints were folded together"
        client.load_weights(root / "model-b", step=1)  # the same weights again, e.g. the next run's start
        first = half()
        assert client.refresh_table().version == version, "a pool survived a weight reload"
        second = half()
        table = client.refresh_table()
        assert table.version == version + 1
        record = table["mid"]
        assert (record.trials, record.successes) == (K, first + second)
        assert (record.checkpoint, record.step) == (str(root / "model-b"), 1)
        assert client.health()["status"] == "ok"
    finally:
        srv.stop()


def _in_process(root, state, **config):
    from nemo_paced.rollout.engines.hf import HFEngine
    from nemo_paced.rollout.service import RolloutService, ServiceConfig

    return RolloutService(HFEngine(str(root / "model-a"), device="cpu"), toy_problems(), first_char_in, state,
                          ServiceConfig(k=2, max_tokens=1, seed=0, **config))


def _run_jobs(service, count: int) -> list[str]:
    service.start()
    try:
        jobs = [service.submit(["low"], k=1) for _ in range(count)]
        deadline = time.monotonic() + 120
        while service.queue_length() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.queue_length() == 0
    finally:
        service.stop()
    return [job.id for job in jobs]


def test_stale_temp_files_are_removed_at_start(workspace, tmp_path):
    """A kill mid-save leaves `.NAME.*.tmp` beside the table or state file; nothing else removes them."""
    state = tmp_path / "state"
    state.mkdir()
    stale = [state / ".passrates.jsonl.k1ll3d.tmp", state / ".service.json.abc.tmp", state / ".jobs.jsonl.x.tmp"]
    for path in stale:
        path.write_text("{half a fi")
    unrelated = [state / "notes.tmp", state / ".passrates.jsonl.bak"]
    for path in unrelated:
        path.write_text("mine")
    _in_process(workspace[0], state)
    assert not any(path.exists() for path in stale)
    assert all(path.read_text() == "mine" for path in unrelated)


def test_finished_jobs_leave_the_state_file_and_their_history_is_bounded(workspace, tmp_path):
    """service.json is rewritten after every batch: it holds only unfinished jobs. Finished ones are
    appended once to jobs.jsonl, which keeps the newest max_history (compacted at twice that)."""
    root = workspace[0]
    state = tmp_path / "state"
    service = _in_process(root, state)
    first = _run_jobs(service, 2)
    assert json.loads((state / "service.json").read_text())["jobs"] == []
    assert [service.job(job_id).status for job_id in first] == ["done", "done"]

    service = _in_process(root, state, max_history=3)
    assert [service.job(job_id).status for job_id in first] == ["done", "done"]  # read back from jobs.jsonl
    ids = first + _run_jobs(service, 6)
    assert json.loads((state / "service.json").read_text())["jobs"] == []
    history = (state / "jobs.jsonl").read_text().splitlines()
    assert len(history) <= 2 * 3
    assert [json.loads(line)["id"] for line in history[-3:]] == ids[-3:]
    assert [service.job(job_id).status for job_id in ids[-3:]] == ["done"] * 3
    for job_id in ids[:-3]:
        with pytest.raises(ValueError, match="no job"):
            service.job(job_id)

    resumed = _in_process(root, state, max_history=3)
    assert [resumed.job(job_id).status for job_id in ids[-3:]] == ["done"] * 3
    with pytest.raises(ValueError, match="no job"):
        resumed.job(ids[-4])
    ids += _run_jobs(resumed, 5)
    assert len((state / "jobs.jsonl").read_text().splitlines()) <= 2 * 3
    assert [_in_process(root, state, max_history=3).job(i).status for i in ids[-3:]] == ["done"] * 3
