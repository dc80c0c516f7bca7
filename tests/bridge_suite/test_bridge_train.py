"""The paper-pair recipe under Bridge's real `pretrain()`: forward and reverse KL at TP=2, the refresh
exports the rollout service reloads, the final Hugging Face export, a preempted stage and its resume,
and the parameter sync before mid-run exports with the distributed optimizer (DP=2).

Each test is one or two torchrun launches; each checks several behaviours of the same run. The
comments name the finding of issue 11 a check proves (each failed on the code before its fix, except
the DP=2 parameter sync: on CPU nothing is stale at a refresh export, docs/bridge.md).
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from tiny import VOCAB

pytestmark = pytest.mark.timeout(1200)


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)


def _weights(path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _load_hf(path).state_dict().items()}


def test_fkl_stage_at_tp2_trains_refreshes_the_service_and_exports(bridge_stage, tiny_models, rollout_service,
                                                                  tmp_path):
    run = bridge_stage(tmp_path / "fkl", "fkl", nproc=2, overrides=["model.tensor_model_parallel_size=2"])
    assert run.code == 0, run.log[-6000:]
    # Bug 1: the checkpoint's 320 rows kept for teacher and student at TP=2 (the tokenizer-derived
    # size, 17 padded to 256, made Bridge load fewer rows than the checkpoint holds).
    for rank in (0, 1):
        start = run.events("start", rank)[0]
        assert start["student_vocab"] == start["teacher_vocab"] == VOCAB
        assert start["student_rows"] == start["teacher_rows"] == VOCAB // 2  # one TP shard each
    steps = run.steps()
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(math.isfinite(loss["paced kl"]) and loss["paced kl"] > 0 for loss in steps.values())
    assert run.steps(1) == steps  # both TP ranks report the same reduced loss
    # Finding 4: refresh exports named by the steps done (the first was named step 0).
    exports = sorted(e["path"] for e in run.events("export"))
    assert [p.rsplit("/", 1)[1] for p in exports] == ["final", "step-0000002", "step-0000004"]
    # The rollout service reloaded the newest refresh export.
    with rollout_service.client() as client:
        health = client.health()
    assert health["checkpoint"] == str(run.out / "student_hf" / "step-0000004") and health["step"] == 4, health
    # The final student loads in transformers, is trained (differs from the init), and in the service.
    final, init = _weights(run.out / "final"), _weights(tiny_models.student)
    assert final.keys() == init.keys()
    assert any(not torch.equal(final[k], init[k]) for k in final)
    with rollout_service.client() as client:
        client.load_weights(run.out / "final", step=99)
        assert client.sample(["p000"], n=2).checkpoint == str(run.out / "final")


def test_rkl_stage_stopped_by_usr1_exits_75_and_resumes_the_same_stream(bridge_stage, tmp_path):
    out = tmp_path / "rkl"
    # The plain optimizer: megatron-core's distributed optimizer cannot load its checkpoint with torch's Adam
    # (no Apex/TE: distrib_optimizer.py:839 asserts on the fresh optimizer's empty state); GPU-only.
    tp2 = ["model.tensor_model_parallel_size=2", "checkpoint.save_interval=4", "optimizer.use_distributed_optimizer=false",
           "ddp.use_distributed_optimizer=false", "ddp.overlap_param_gather=false"]
    # Finding 3: SIGUSR1 (train.sbatch's requeue warning) stops the stage with a checkpoint, exit 75.
    stopped = bridge_stage(out, "rkl", nproc=2, overrides=tp2, stop=(signal.SIGUSR1, 1))
    # each rank's `nemo-paced train` exits 75 (srun in train.sbatch passes it on; torchrun reports 1)
    codes = [e["code"] for rank in (0, 1) for e in stopped.events("exit", rank)]
    assert stopped.code != 0 and codes and set(codes) == {75}, stopped.log[-6000:]
    done = max(stopped.steps())
    assert 1 <= done < 4, "the signal must land mid-stage"
    tracker = out / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text().strip() == str(done)  # a signal checkpoint, off the save interval
    assert not (out / "final").exists()
    saved = json.loads((out / "checkpoints" / "paced_sampler" / f"iter_{done:07d}.json").read_text())
    # Finding 2: the restart resumes from that checkpoint (checkpoint.load = save) with the stream's
    # state of that step, and finishes at the same step as an uninterrupted stage.
    resumed = bridge_stage(out, "rkl", nproc=2, overrides=tp2)
    assert resumed.code == 0, resumed.log[-6000:]
    start = resumed.events("start")[0]
    assert start["step"] == done and start["stream"] == saved
    assert sorted(resumed.steps()) == list(range(done + 1, 5))
    assert tracker.read_text().strip() == "4" and (out / "final" / "config.json").exists()


def test_mid_run_export_with_distributed_optimizer_is_synced(bridge_stage, tmp_path):
    # Finding 4: with the distributed optimizer and overlapped param all-gather (both on in the base
    # recipe), the refresh export at the last step equals the final export, made after Bridge's own
    # parameter sync; without the sync, the half of the parameters owned by the other DP rank would be
    # stale. Under gloo on CPU they are already current at that point (measured, docs/bridge.md), so this
    # passes without the sync too: a guard for GPU runs, not failing-first evidence.
    run = bridge_stage(tmp_path / "dp2", "fkl", nproc=2,
                       overrides=["optimizer.use_distributed_optimizer=true", "ddp.overlap_param_gather=true",
                                  "ddp.overlap_grad_reduce=true", "model.sequence_parallel=false"])
    assert run.code == 0, run.log[-6000:]
    refresh, final = _weights(run.out / "student_hf" / "step-0000004"), _weights(run.out / "final")
    stale = [k for k in final if not torch.equal(refresh[k], final[k])]
    assert not stale, f"parameters differ between the step-4 export and the final one: {stale}"


@pytest.mark.skipif(os.environ.get("BRIDGE_SUITE_GPU") != "1", reason="GPU only: bench/gpu_smoke.sh runs it on one GPU")
def test_fkl_stage_on_one_gpu_with_nccl(bridge_stage, tmp_path):
    """The same recipe as built for H100s (Transformer Engine layers, bf16, NCCL), on the tiny models."""
    run = bridge_stage(tmp_path / "gpu", "fkl", nproc=1)
    assert run.code == 0, run.log[-6000:]
    steps = run.steps()
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(math.isfinite(loss["paced kl"]) for loss in steps.values())
    assert (run.out / "final" / "config.json").exists()
    print("GPU fkl stage losses:", steps)
