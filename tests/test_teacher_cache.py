"""The teacher cache for real: a tiny random GPT-2 teacher scores hand-made references through
`nemo-paced teacher-cache` (in-process and through a served teacher), then the cache is checked against
the teacher's full-vocabulary log-softmax, against skipping at weight 0, resuming and corruption."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from rollout_toys import save_tiny_model

from nemo_paced.batches import BatchBuilder
from nemo_paced.passrates import Outcome, PassRateTable
from nemo_paced.problems import load_problems
from nemo_paced.references import ReferenceBatches, load_references
from nemo_paced.sampler import Draw
from nemo_paced.teacher.cache import (CacheConfig, CacheError, CachedReferenceBatches, TeacherCache, build_cache,
                                      reference_items)
from nemo_paced.teacher.engines import HFScorer, tokenizer_fingerprint

K = 8
# (id, prompt, verified reference texts)
PROBLEMS = [("a", "12+34=", ["46"]), ("b", "5-6=", ["-1", "-1.0"]), ("c", "7+7=", ["14"]), ("d", "9-9=", ["0"]),
            ("e", "2+2+2=", ["6"]), ("f", "88-8=", ["80"])]
# a: p=0 and f: p=1 under the first table (weight 0); e never estimated (weight 0 under unknown=exclude)
FIRST_TABLE = [Outcome("a", 0, 8), Outcome("b", 3, 8), Outcome("c", 4, 8), Outcome("d", 1, 8), Outcome("f", 8, 8)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model = save_tiny_model(root / "teacher", seed=5)
    with open(root / "problems.jsonl", "w") as f:
        for pid, prompt, _ in PROBLEMS:
            f.write(json.dumps({"id": pid, "prompt": prompt, "answer": "0"}) + "\n")
    with open(root / "refs.jsonl", "w") as f:
        f.write(json.dumps({"format": "nemo-paced.references", "schema": 1, "settings": {}}) + "\n")
        for pid, prompt, texts in PROBLEMS:
            refs = [{"text": t, "token_ids": [], "finish_reason": "stop", "score": 1} for t in texts]
            f.write(json.dumps({"problem_id": pid, "prompt": prompt, "tried": len(texts), "verified": len(texts),
                                "references": refs}) + "\n")
    table = PassRateTable()
    table.update(FIRST_TABLE)
    table.save(root / "table1.jsonl")
    table.update([Outcome("a", 2, 8), Outcome("e", 5, 8)])  # a and e now carry weight
    table.save(root / "table2.jsonl")
    return root, model


def cache_command(root, out, *extra, check=True):
    result = subprocess.run([sys.executable, "-m", "nemo_paced", "teacher-cache", "--teacher", str(root / "teacher"),
                             "--problems", str(root / "problems.jsonl"), "--references", str(root / "refs.jsonl"),
                             "--template", "raw", "--k", str(K), "--out", str(out), *extra],
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def references(root, seq_length=64):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "teacher")
    return ReferenceBatches(load_problems(root / "problems.jsonl"), load_references(root / "refs.jsonl"),
                            BatchBuilder(tokenizer, seq_length), "raw"), tokenizer


def full_logprobs(model, tokens, start):
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1)[start - 1:len(tokens) - 1]


def test_cache_holds_the_teachers_top_k_and_skips_weight_zero_then_fills_in(workspace, tmp_path):
    root, model = workspace
    out = tmp_path / "cache"
    first = cache_command(root, out, "--passrates", str(root / "table1.jsonl"), "--shard-tokens", "4",
                          "--batch-sequences", "2")
    assert "4 sequences scored now" in first.stdout and "3 problems skipped at weight 0" in first.stdout
    assert f"{6 * K + 2} bytes per cached token" in first.stdout
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["skipped"]) == ["a", "e", "f"] and sorted(index["entries"]) == ["b", "c", "d"]
    batches, tokenizer = references(root)
    items = {(i.problem_id, i.ref): i for i in reference_items(batches)}
    assert index["skipped_tokens"] == sum(len(i.tokens) - i.start for (p, _), i in items.items() if p in "aef")
    cache = TeacherCache(out, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), checksums=True)
    for pid in "bcd":
        for ref in range(len(batches.references[pid])):
            item = items[(pid, ref)]
            ids, logprobs = cache.lookup(pid, ref, item.tokens, item.start)
            exact = full_logprobs(model, item.tokens, item.start)
            values, top = torch.topk(exact, K, dim=-1)
            assert ids.shape == (len(item.tokens) - item.start, K) and ids.dtype == torch.int64
            np.testing.assert_array_equal(ids.numpy(), top.numpy())
            np.testing.assert_allclose(logprobs.numpy(), values.numpy(), atol=2e-3)  # float16 storage
    shard_bytes = sum(s["bytes"] for s in index["shards"])
    tokens = sum(s["tokens"] for s in index["shards"])
    assert tokens * (6 * K + 2) <= shard_bytes <= tokens * (6 * K + 2) + 1024 * len(index["shards"])
    before = {s["file"]: (out / s["file"]).read_bytes() for s in index["shards"]}

    second = cache_command(root, out, "--passrates", str(root / "table2.jsonl"))
    assert "2 sequences scored now" in second.stdout and "4 already cached" in second.stdout
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["skipped"]) == ["f"] and sorted(index["entries"]) == ["a", "b", "c", "d", "e"]
    assert all((out / name).read_bytes() == data for name, data in before.items())  # old shards untouched
    assert len(index["shards"]) == len(before) + 1


def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(workspace, tmp_path):
    root, _ = workspace
    batches, tokenizer = references(root)
    items = reference_items(batches)
    scorer = HFScorer(str(root / "teacher"))
    teacher = {"model": "t", "engine": "hf", "vocab_size": scorer.vocab_size,
               "tokenizer": tokenizer_fingerprint(tokenizer)}
    config = CacheConfig(k=K, shard_tokens=1, batch_sequences=1)
    calls = []

    def dies_on_the_fourth_call(sequences, starts, k):
        calls.append(len(sequences))
        if len(calls) == 4:
            raise KeyboardInterrupt  # the process is killed mid-run
        return scorer.score(sequences, starts, k)

    with pytest.raises(KeyboardInterrupt):
        build_cache(dies_on_the_fourth_call, teacher, items, None, tmp_path / "x", config)
    assert len(json.loads((tmp_path / "x" / "index.json").read_text())["shards"]) == 3
    (tmp_path / "x" / ".shard-00003.safetensors.abc.tmp").write_bytes(b"torn")  # a write in flight
    summary = build_cache(scorer.score, teacher, items, None, tmp_path / "x", config)
    assert (summary.cached, summary.scored) == (3, len(items) - 3)
    assert not list((tmp_path / "x").glob(".*.tmp"))
    build_cache(scorer.score, teacher, items, None, tmp_path / "y", config)
    resumed, clean = TeacherCache(tmp_path / "x"), TeacherCache(tmp_path / "y")
    for item in items:
        a = resumed.lookup(item.problem_id, item.ref, item.tokens, item.start)
        b = clean.lookup(item.problem_id, item.ref, item.tokens, item.start)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(CacheError, match="other settings \\(k\\)"):
        build_cache(scorer.score, teacher, items, None, tmp_path / "x", CacheConfig(k=K + 1))


def test_a_wrong_tokenizer_a_truncated_shard_and_a_changed_reference_are_named(workspace, tmp_path):
    root, _ = workspace
    out = tmp_path / "cache"
    cache_command(root, out, "--shard-tokens", "6")
    batches, tokenizer = references(root)
    item = next(i for i in reference_items(batches) if i.problem_id == "c")
    with pytest.raises(CacheError, match="another tokenizer"):
        TeacherCache(out, tokenizer_fingerprint="0123456789abcdef")
    with pytest.raises(CacheError, match="vocabulary .* larger than the student's"):
        TeacherCache(out, vocab_size=5)
    cache = TeacherCache(out)
    changed = [*item.tokens[:-1], item.tokens[-1] ^ 1]
    entry = cache.index["entries"]["c"][0]
    shard = cache.index["shards"][entry["shard"]]["file"]
    with pytest.raises(CacheError, match=f"{shard}: problem 'c' reference 0: the cached sequence no longer matches"):
        cache.lookup("c", 0, changed, item.start)
    with pytest.raises(CacheError, match="problem 'zz' reference 0: not in the cache"):
        cache.lookup("zz", 0, item.tokens, item.start)
    path = out / shard
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=f"{shard}: .* bytes, the index says .*truncated"):
        TeacherCache(out)
    with pytest.raises(CacheError, match="no index.json: not a teacher cache"):
        TeacherCache(tmp_path)
    other = cache_command(root, out, "--logprob-dtype", "bfloat16", check=False)
    assert other.returncode == 2 and "other settings (dtype" in other.stderr


def test_cached_batches_put_the_teacher_rows_on_the_positions_that_predict_the_response(workspace, tmp_path):
    root, model = workspace
    out = tmp_path / "cache"
    cache_command(root, out, "--passrates", str(root / "table1.jsonl"))
    batches, tokenizer = references(root, seq_length=7)  # "b" reference 1 ("-1.0" + eos after "5-6=") is cut
    cached = CachedReferenceBatches(batches, TeacherCache(out), vocab_size=len(tokenizer))
    assert cached.problem_ids == ["b", "c", "d"]  # a, e, f were skipped at weight 0
    for step in (0, 1):
        batch = cached(Draw(step, 0, np.arange(3), ["b", "c", "d"], np.ones(3, np.float32), 1, 0))
        assert batch["teacher_ids"].shape == batch["teacher_logprobs"].shape == (3, 7, K)
        for b in range(3):
            tokens = batch["tokens"][b]
            positions = torch.nonzero(batch["loss_mask"][b]).squeeze(1)
            with torch.no_grad():
                exact = torch.log_softmax(model(tokens[None]).logits[0].double(), -1)
            for t in positions.tolist():
                top = torch.topk(exact[t], K)
                assert batch["teacher_ids"][b, t].tolist() == top.indices.tolist()
                np.testing.assert_allclose(batch["teacher_logprobs"][b, t].numpy(), top.values.numpy(), atol=2e-3)
            masked = batch["loss_mask"][b] == 0  # padding rows: distinct ids, finite log-probs
            assert (batch["teacher_ids"][b][masked] == torch.arange(K)).all()


def test_a_cache_scored_through_the_teacher_service_equals_one_scored_in_process(workspace, tmp_path):
    from teacher_toys import TeacherServer

    root, _ = workspace
    server = TeacherServer(root / "teacher", tmp_path, "--max-sequences", "2")
    try:
        cache_command(root, tmp_path / "served", "--service", str(server.address))
    finally:
        server.stop()
    cache_command(root, tmp_path / "local")
    served, local = TeacherCache(tmp_path / "served"), TeacherCache(tmp_path / "local")
    assert served.index["teacher"]["engine"] == "service:hf" and served.problem_ids == local.problem_ids
    batches, _ = references(root)
    for item in reference_items(batches):
        a = served.lookup(item.problem_id, item.ref, item.tokens, item.start)
        b = local.lookup(item.problem_id, item.ref, item.tokens, item.start)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
