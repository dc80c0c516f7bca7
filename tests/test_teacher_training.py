"""Training without the teacher in the job, for real: the single-machine trainer's forward-KL stage from
a teacher cache and its reverse-KL stage against `nemo-paced serve-teacher`, both on loopback with real
tiny models, compared with the same runs holding the teacher in the job."""

from dataclasses import replace

import pytest
import torch

from nemo_paced.demo.service import loopback_service
from nemo_paced.passrates import PassRateTable
from nemo_paced.problems import save_problems
from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.tasks import ChainTask, make_splits
from nemo_paced.tiny_models import PretrainConfig, TinyModelConfig, cached_pretrained
from nemo_paced.train.local import LocalTrainConfig, train

try:
    from nemo_paced.loss import topk_kl  # noqa: F401
except ImportError:  # issue 13 item 1, written in nemo_paced/loss by another change
    pytest.skip("nemo_paced.loss.topk_kl (the sparse KL these runs train with) is not in this tree yet",
                allow_module_level=True)

TASK = ChainTask(max_level=3)
STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoConfig, AutoTokenizer

    from nemo_paced.batches import BatchBuilder
    from nemo_paced.problems import load_problems
    from nemo_paced.references import ReferenceBatches, ReferenceConfig, load_references, make_references
    from nemo_paced.rollout.client import RolloutClient
    from nemo_paced.rollout.engines.hf import HFEngine
    from nemo_paced.rollout.verifiers import resolve
    from nemo_paced.teacher.cache import CacheConfig, build_cache, reference_items
    from nemo_paced.teacher.engines import HFScorer, tokenizer_fingerprint

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("frontier")
    teacher = cached_pretrained(root / "cache", "teacher", TASK, TinyModelConfig(2, 32, 2),
                                PretrainConfig(steps=200, batch_size=32, level_weights={1: 1, 2: 1, 3: 1}))
    student = cached_pretrained(root / "cache", "student", TASK, TinyModelConfig(1, 32, 2),
                                PretrainConfig(steps=120, batch_size=32, level_weights={1: 1, 2: 1}))
    splits = make_splits(TASK, pool_per_level=16, test_per_level=4, retained_size=4)
    pool = [replace(p, meta={**p.meta, "split": "train"}) for p in splits.pool]
    tests = [replace(p, meta={**p.meta, "split": "test", "benchmark": f"L{level}"})
             for level, ps in splits.test.items() for p in ps]
    problems = root / "problems.jsonl"
    save_problems(problems, pool + tests)
    refs = root / "references.jsonl"
    make_references(HFEngine(str(teacher), device="cpu"), pool, resolve("exact"), refs,
                    ReferenceConfig(n=1, template="raw", temperature=0.0, max_tokens=4))
    with loopback_service(str(student), pool + tests, root / "service", max_tokens=4) as url:
        with RolloutClient(url) as client:
            client.wait(client.estimate([p.id for p in pool]), poll=0.05)
            table = PassRateTable()
            table.merge(*reversed(client.table_since(0)))
    table.save(root / "passrates.jsonl")
    vocab = AutoConfig.from_pretrained(teacher).vocab_size
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    items = reference_items(ReferenceBatches(load_problems(problems), load_references(refs),
                                             BatchBuilder(tokenizer, 1 << 20), "raw"))
    scorer = HFScorer(str(teacher))
    identity = {"model": str(teacher), "engine": "hf", "vocab_size": vocab, "tokenizer": tokenizer_fingerprint(tokenizer)}
    caches = {}
    for k in (vocab, 4):
        caches[k] = root / f"cache-k{k}"
        build_cache(scorer.score, identity, items, None, caches[k], CacheConfig(k=k, dtype="float16"),
                    settings={"template": "raw"})
    return {"root": root, "teacher": str(teacher), "student": str(student), "problems": str(problems),
            "references": str(refs), "passrates": str(root / "passrates.jsonl"), "pool": pool, "tests": tests,
            "vocab": vocab, "caches": caches}


def _config(setup, out, url, stage, **overrides):
    split = 1.0 if stage == "fkl" else 0.0
    base = dict(student=setup["student"], teacher=setup["teacher"], problems=setup["problems"],
                references=setup["references"] if stage == "fkl" else None, passrates=setup["passrates"],
                rollout=url, out_dir=str(out), batch_size=8, seq_length=TASK.prompt_width + 5, checkpoint_every=50,
                progress=False, final_estimate=False, eval_every=0, stage=stage,
                schedule=TwoStageSchedule(total_steps=STEPS, fkl_fraction=split))
    return LocalTrainConfig(**{**base, **overrides})


def _losses(result):
    return [s["loss"] for s in result["history"]["steps"]]


def _params(path):
    from transformers import AutoModelForCausalLM

    return torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(path).parameters()])


def test_forward_kl_from_a_full_vocabulary_cache_trains_like_the_teacher_in_the_job(setup, tmp_path):
    """k = V with the bucket tail is the full-vocabulary KL; the cache stores float16 log-probs."""
    problems = setup["pool"] + setup["tests"]
    with loopback_service(setup["student"], problems, tmp_path / "service", max_tokens=4) as url:
        colocated = train(_config(setup, tmp_path / "colocated", url, "fkl"))
        cached = train(_config(setup, tmp_path / "cached", url, "fkl", teacher=str(tmp_path / "no-teacher-here"),
                               teacher_cache=str(setup["caches"][setup["vocab"]])))
        top4 = train(_config(setup, tmp_path / "top4", url, "fkl", teacher=str(tmp_path / "no-teacher-here"),
                             teacher_cache=str(setup["caches"][4]), schedule=TwoStageSchedule(1, fkl_fraction=1.0)))
    assert cached["status"] == colocated["status"] == "done"
    # float16 log-probs: a few per mille per token, compounding over the steps
    torch.testing.assert_close(torch.tensor(_losses(cached)), torch.tensor(_losses(colocated)), rtol=5e-2, atol=1e-4)
    torch.testing.assert_close(_params(tmp_path / "cached" / "final"), _params(tmp_path / "colocated" / "final"),
                               rtol=0, atol=1e-3)
    # the (k+1)-outcome coarsening can only lose divergence (data processing inequality)
    assert _losses(top4)[0] <= _losses(colocated)[0] + 1e-3


def test_reverse_kl_against_the_teacher_service_trains_like_the_teacher_in_the_job(setup, tmp_path):
    from teacher_toys import TeacherServer

    problems = setup["pool"] + setup["tests"]
    server = TeacherServer(setup["teacher"], tmp_path)
    try:
        with loopback_service(setup["student"], problems, tmp_path / "service", max_tokens=4) as url:
            colocated = train(_config(setup, tmp_path / "colocated", url, "rkl"))
            served = train(_config(setup, tmp_path / "served", url, "rkl", teacher=str(tmp_path / "no-teacher-here"),
                                   teacher_service=str(server.address), teacher_k=setup["vocab"]))
            sampled = train(_config(setup, tmp_path / "sampled", url, "rkl", teacher=str(tmp_path / "no-teacher-here"),
                                    teacher_service=str(server.address), rkl_estimator="sampled"))
    finally:
        server.stop()
    assert served["status"] == colocated["status"] == "done"
    # the same student draws the same seeded samples, which both teachers score alike
    torch.testing.assert_close(_losses(served)[0], _losses(colocated)[0], rtol=1e-4, atol=1e-6)
    assert all(torch.isfinite(torch.tensor(_losses(served) + _losses(sampled))))
    assert sampled["status"] == "done" and len(_losses(sampled)) == STEPS
