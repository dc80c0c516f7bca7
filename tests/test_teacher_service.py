"""The teacher scorer and service for real: a tiny random GPT-2 scored directly, in-process and through
`nemo-paced serve-teacher` on 127.0.0.1, checked against full-vocabulary log-softmax from autograd-free
teacher forcing."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from rollout_toys import save_tiny_model
from teacher_toys import TeacherServer

from nemo_paced.rollout.client import RequestRejected
from nemo_paced.serving import RequestError
from nemo_paced.teacher.client import TeacherClient
from nemo_paced.teacher.engines import HFScorer, tokenizer_fingerprint
from nemo_paced.teacher.service import TeacherService, TeacherServiceConfig

SEQUENCES = [[3, 5, 7, 1, 2, 9, 4], [1, 4], [6, 6, 6, 6, 2, 8, 8, 0, 11, 12, 13], [2, 3, 4, 5]]
STARTS = [3, 1, 5, 2]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    model = save_tiny_model(root / "teacher", seed=3)
    return root, model


def full_logprobs(model, tokens, start):
    """Log-softmax over the whole vocabulary at the positions predicting tokens[start:], one sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1)[start - 1:len(tokens) - 1]


def test_hf_scorer_returns_the_top_k_of_the_full_vocabulary_log_softmax(teacher):
    root, model = teacher
    scorer = HFScorer(str(root / "teacher"), batch_tokens=20)  # several padded batches
    k = 5
    results = scorer.score(SEQUENCES, STARTS, k)
    for tokens, start, result in zip(SEQUENCES, STARTS, results):
        exact = full_logprobs(model, tokens, start)
        values, ids = torch.topk(exact, k, dim=-1)
        assert result.ids.shape == result.logprobs.shape == (len(tokens) - start, k)
        np.testing.assert_array_equal(result.ids, ids.numpy())
        np.testing.assert_allclose(result.logprobs, values.numpy(), atol=2e-5)
        actual = exact.gather(1, torch.tensor(tokens[start:])[:, None]).squeeze(1)
        np.testing.assert_allclose(result.token_logprobs, actual.numpy(), atol=2e-5)
        assert (np.exp(result.logprobs.astype(np.float64)).sum(1) <= 1 + 1e-6).all()
    everything = scorer.score(SEQUENCES[:1], STARTS[:1], scorer.vocab_size)[0]  # k = V: the whole distribution
    np.testing.assert_allclose(np.exp(everything.logprobs.astype(np.float64)).sum(1), 1.0, atol=1e-5)


def test_hf_scorer_refuses_bad_input_naming_it(teacher):
    root, _ = teacher
    scorer = HFScorer(str(root / "teacher"))
    with pytest.raises(ValueError, match="sequence 1: token 999 at position 2"):
        scorer.score([[1, 2, 3], [1, 2, 999]], [1, 1], 3)
    with pytest.raises(ValueError, match="sequence 0: start 3"):
        scorer.score([[1, 2, 3]], [3], 3)
    with pytest.raises(ValueError, match="k must lie in"):
        scorer.score([[1, 2, 3]], [1], scorer.vocab_size + 1)


def test_waiting_requests_are_merged_and_a_full_queue_is_refused(teacher):
    root, _ = teacher
    scorer = HFScorer(str(root / "teacher"))
    service = TeacherService(scorer, TeacherServiceConfig(max_pending=3, max_k=8))
    expected = scorer.score(SEQUENCES, STARTS, 8)
    results, threads = {}, []
    for i in range(3):  # the worker is not running yet: all three wait in the queue
        threads.append(threading.Thread(target=lambda i=i: results.__setitem__(
            i, service.score(SEQUENCES[i:i + 2], STARTS[i:i + 2], 4 + i))))
        threads[-1].start()
    deadline = time.monotonic() + 30
    while service._queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RequestError, match="busy") as refused:
        service.score(SEQUENCES[:1], STARTS[:1], 2)
    assert refused.value.status == 503
    service.start()
    for t in threads:
        t.join(60)
    service.stop()
    assert service.batches == 1 and service.busy == 1  # three requests, one engine call
    for i in range(3):
        for got, want in zip(results[i], expected[i:i + 2]):
            np.testing.assert_array_equal(got.ids, want.ids[:, :4 + i])
            np.testing.assert_allclose(got.logprobs, want.logprobs[:, :4 + i], atol=1e-6)
            np.testing.assert_allclose(got.token_logprobs, want.token_logprobs, atol=1e-6)


@pytest.fixture(scope="module")
def server(teacher):
    root, _ = teacher
    srv = TeacherServer(root / "teacher", root, "--max-k", "16", "--max-tokens", "12", "--max-sequences", "3",
                        "--max-request-bytes", "4096")
    yield srv
    assert srv.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean shutdown
    assert not srv.address.exists()  # removed on shutdown


def test_served_scores_equal_the_scorer_and_large_requests_are_split(server, teacher):
    root, model = teacher
    client = TeacherClient.connect(server.address)
    health = client.health()
    scorer = HFScorer(str(root / "teacher"))
    assert health["vocab_size"] == scorer.vocab_size and health["tokenizer"] == tokenizer_fingerprint(scorer.tokenizer)
    served = client.score(SEQUENCES, STARTS, 16)  # 4 sequences, --max-sequences 3: two requests
    for got, want in zip(served, scorer.score(SEQUENCES, STARTS, 16)):
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6)
        np.testing.assert_allclose(got.token_logprobs, want.token_logprobs, atol=1e-6)
    assert "nemo_paced_teacher_sequences_total 4" in client.metrics()


@pytest.mark.parametrize("body, status, field", [
    ({"k": 4, "sequences": [{"tokens": [1, 2], "start": 1}, {"tokens": [1, 2, 3, 999], "start": 1}]}, 422,
     "sequences[1].tokens[3]"),
    ({"k": 4, "sequences": [{"tokens": [1, 2, 3], "start": 0}]}, 422, "sequences[0].start"),
    ({"k": 17, "sequences": [{"tokens": [1, 2, 3], "start": 1}]}, 422, "k"),
    ({"k": 4, "sequences": [{"tokens": list(range(13)), "start": 1}]}, 422, "sequences[0].tokens"),
    ({"k": "4", "sequences": [{"tokens": [1, 2], "start": 1}]}, 422, "k"),
    ({"k": 4, "sequences": [{"tokens": [1, 2.5], "start": 1}]}, 422, "tokens"),
    ({"k": True, "sequences": [{"tokens": [1, 2], "start": 1}]}, 422, "k"),
    ({"k": 4, "sequences": [{"tokens": [1, 2], "start": 1, "stat": 2}]}, 422, "stat"),
    ({"k": 4, "sequences": [{"tokens": [1, 2], "start": 1}] * 4}, 422, "sequences"),
    ({"k": 4, "sequences": [{"tokens": [1] * 12, "start": 1}] * 3, "pad": "x" * 5000}, 413, None),
])
def test_bad_requests_are_refused_naming_the_field_and_the_service_stays_healthy(server, body, status, field):
    response = httpx.post(f"{server.url}/score", json=body, timeout=30)
    assert response.status_code == status, response.text
    if field is not None:
        assert field in response.text
    assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"


def test_client_raises_request_rejected_naming_the_position(server):
    client = TeacherClient.connect(server.address)
    with pytest.raises(RequestRejected, match=r"sequences\[0\]\.tokens\[2\]"):
        client.score([[1, 2, 500]], [1], 4)


def test_a_token_is_required_off_loopback_and_checked_on_every_request(teacher, tmp_path):
    root, _ = teacher
    (tmp_path / "token").write_text("s3cret\n")
    refused = subprocess.run([sys.executable, "-m", "nemo_paced", "serve-teacher", "--teacher", str(root / "teacher"),
                              "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "NEMO_PACED_TEACHER_TOKEN"})
    assert refused.returncode != 0 and "bearer token is required" in refused.stderr
    srv = TeacherServer(root / "teacher", tmp_path, "--token-file", str(tmp_path / "token"))
    try:
        body = {"k": 2, "sequences": [{"tokens": [1, 2, 3], "start": 1}]}
        assert httpx.post(f"{srv.url}/score", json=body, timeout=30).status_code == 401
        assert httpx.get(f"{srv.url}/health", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        client = TeacherClient.connect(srv.address)  # the address file names the token file
        assert client.score([[1, 2, 3]], [1], 2)[0].ids.shape == (2, 2)
        assert "s3cret" not in srv.address.read_text()
    finally:
        srv.stop()


def test_the_client_splits_requests_to_the_services_row_and_byte_bounds():
    import json

    from nemo_paced.teacher.client import pack

    rows = [{"tokens": list(range(n)), "start": 1} for n in (2, 300, 5, 5, 5, 700, 3)]
    parts = pack(rows, max_rows=3, max_bytes=1200)
    assert [row for part in parts for row in part] == rows  # every row, in order
    for part in parts:
        assert len(part) <= 3
        assert len(part) == 1 or len(json.dumps({"k": 64, "sequences": part})) <= 1200
    assert [len(p) for p in parts] == [1, 1, 3, 1, 1]  # 300 and 700 tokens are over the bound alone: sent alone
