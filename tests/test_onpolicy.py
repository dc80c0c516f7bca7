"""The reverse-KL data source against a real `nemo-paced serve-rollouts` on 127.0.0.1 (tiny random GPT-2)."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rollout_toys import TOY_PROBLEMS, save_tiny_model

from gloo_ranks import run_ranks
from nemo_paced.batches import BatchBuilder
from nemo_paced.onpolicy import OnPolicyBatches, SamplingSettings
from nemo_paced.passrates import PassRateTable
from nemo_paced.rollout.client import RolloutClient
from nemo_paced.sampler import AllWeightsZero, PacedSampler, SamplerConfig
from nemo_paced.weighting import WeightConfig

TESTS = Path(__file__).parent
IDS = [p[0] for p in TOY_PROBLEMS]
PROMPTS = {p[0]: p[1] for p in TOY_PROBLEMS}
CONFIG = SamplerConfig(global_batch_size=4, micro_batch_size=2, weighting=WeightConfig(mode="loss"), seed=5)
SEQ = 16


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy")
    save_tiny_model(root / "student", seed=0)
    save_tiny_model(root / "student-b", seed=1)
    with open(root / "problems.jsonl", "w") as f:
        for problem_id, prompt, answer in TOY_PROBLEMS:
            f.write(json.dumps({"id": problem_id, "prompt": prompt, "answer": answer}) + "\n")
    address = root / "address.json"
    log = open(root / "service.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "nemo_paced", "serve-rollouts", "--model", str(root / "student"),
         "--problems", str(root / "problems.jsonl"), "--state-dir", str(root / "state"),
         "--verifier", "rollout_toys:first_char_in", "--template", "raw", "--k", "4", "--max-tokens", "3",
         "--seed", "0", "--port", "0", "--address-file", str(address), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])})
    deadline = time.monotonic() + 180
    while not address.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"service did not start: {(root / 'service.log').read_text()[-3000:]}")
        time.sleep(0.1)
    client = RolloutClient.connect(address, retries=2, backoff=0.05)
    yield root, client
    client.close()
    process.terminate()
    process.wait(60)
    log.close()


def _table() -> PassRateTable:
    """Frontier pass rates for the sampler (what an estimation job would have produced)."""
    table = PassRateTable()
    table.update([(problem_id, k, 8) for problem_id, k in zip(IDS, [0, 4, 2, 6, 3, 8])], step=0)
    return table


def _builder(root):
    from transformers import AutoTokenizer

    return BatchBuilder(AutoTokenizer.from_pretrained(root / "student"), seq_length=SEQ)


def test_batches_from_the_service_are_prefetched_weighted_and_report_their_lag(service, caplog):
    root, client = service
    table = _table()
    weights = dict(zip(IDS, table.weights(IDS, CONFIG.weighting)))
    assert weights["none"] == 0 and weights["all"] == 0  # pass rates 0 and 1 by construction
    builder = _builder(root)
    source = OnPolicyBatches(PacedSampler(IDS, CONFIG, table), client, builder, prefetch=2)
    with caplog.at_level(logging.INFO, logger="nemo_paced.onpolicy"):
        batches = [next(source)]
        # generation runs on the worker thread while "training" happens here
        assert len(source._pending) == 2
        for _, _, future in source._pending:
            future.result(timeout=60)
        batches += [next(source) for _ in range(3)]
        client.load_weights(root / "student-b", step=1)  # the trainer published step 1's weights
        batches += [next(source) for _ in range(6)]
    for batch in batches:
        assert batch["tokens"].shape == (2, SEQ)
        for row, problem_id in enumerate(batch["problem_ids"]):
            assert weights[problem_id] > 0
            assert batch["sample_weight"][row].item() == pytest.approx(weights[problem_id])
            prompt_length = len(PROMPTS[problem_id])  # one token per character
            assert builder.tokenizer.decode(batch["tokens"][row][:prompt_length]) == PROMPTS[problem_id]
            assert 1 <= batch["loss_mask"][row].sum() <= 3  # max_tokens 3
            assert batch["loss_mask"][row][prompt_length - 1] == 1
    assert batches[0]["rollout_lag"] is None  # the service did not know the step of its first weights
    new = [(i, b) for i, b in enumerate(batches) if b["rollout_checkpoint"] == str(root / "student-b")]
    assert new and all(b["rollout_lag"] == i // 2 - 1 for i, b in new)  # 2 micro-batches per step
    assert any(f"(step 1): lag {new[-1][0] // 2 - 1} steps" in r.getMessage() for r in caplog.records)
    # the verifier scores went back into the service's table (pooled to K = 4 per problem)
    version, records = client.table_since(0)
    assert version > 0 and any(r.checkpoint == str(root / "student-b") and r.trials == 4 for r in records)
    source.close()


def test_resume_continues_the_same_problems_and_seeded_samples(service):
    root, client = service
    table = _table()
    seeded = SamplingSettings(seed=11, fold=False)
    source = OnPolicyBatches(PacedSampler(IDS, CONFIG, table), client, _builder(root), prefetch=2, sampling=seeded)
    for _ in range(3):
        next(source)
    state = json.loads(json.dumps(source.state_dict()))
    expected = [next(source) for _ in range(4)]
    source.close()
    resumed = OnPolicyBatches(PacedSampler(IDS, CONFIG, table), client, _builder(root), prefetch=3, sampling=seeded)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(4)]
    resumed.close()
    assert [b["problem_ids"] for b in got] == [b["problem_ids"] for b in expected]
    for a, b in zip(got, expected):  # same seeds, same weights: the very same samples
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["loss_mask"], b["loss_mask"])


def test_prefetched_batches_are_trained_before_the_stage_stops(service):
    root, client = service
    frontier = _table()
    mastered = _table()
    mastered.update([(i, 4, 4) for i in IDS])  # version 2: the sampler swaps it in at step 1
    tables = iter([frontier, mastered])
    config = SamplerConfig(global_batch_size=4, micro_batch_size=2, seed=5)
    source = OnPolicyBatches(PacedSampler(IDS, config, lambda: next(tables)), client, _builder(root), prefetch=2)
    assert len([next(source), next(source)]) == 2  # step 0 was drawn before the table said "all mastered"
    with pytest.raises(AllWeightsZero, match="all 6 problems have weight 0"):
        next(source)
    source.close()


def _peer_batches(rank: int, world_size: int, url: str, model: str) -> list:
    from transformers import AutoTokenizer

    table = _table()
    client = RolloutClient(url if rank == 0 else "http://127.0.0.1:9", retries=0)  # rank 1's points nowhere
    source = OnPolicyBatches(PacedSampler(IDS, CONFIG, table), client,
                             BatchBuilder(AutoTokenizer.from_pretrained(model), seq_length=SEQ), prefetch=2)
    out = []
    for _ in range(4):
        batch = next(source)
        out.append({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    source.close()
    return out


@pytest.mark.distributed
def test_tp_peers_train_on_the_same_samples_fetched_once(service):
    root, client = service
    first, second = run_ranks(_peer_batches, 2, client.url, str(root / "student"), timeout=240)
    assert first == second
    assert all(np.sum(b["loss_mask"]) > 0 for b in first)
