"""Pipeline parallelism under Bridge's `pretrain()` on CPU: the Paced step at PP=2 and TP=2 x PP=2.

Teacher and student share the layout (ModelOpt's requirement); the tiny teacher's 3 layers split 2 + 1
over the two stages (`model.teacher.num_layers_in_*_pipeline_stage`), the student's 2 evenly. The loss
and gradient norm Bridge logs at step 1 on the last stage must equal the float64 reference of the same
micro-batches (test_bridge_parity.py), and the exports, gathered from both stages, must load.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_bridge_parity import check_step_one

pytestmark = pytest.mark.timeout(900)

TEACHER_SPLIT = ["model.teacher.num_layers_in_first_pipeline_stage=2",
                 "model.teacher.num_layers_in_last_pipeline_stage=1"]


def _loads(path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.num_hidden_layers == 2


def test_fkl_stage_at_pp2_matches_the_reference_and_exports(bridge_stage, tiny_models, tmp_path):
    run = bridge_stage(tmp_path / "pp2", "fkl", nproc=2,
                       overrides=["model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
                                  "model.pipeline_model_parallel_size=2", *TEACHER_SPLIT, "train.train_iters=2"])
    assert run.code == 0, run.log[-6000:]
    last = 1  # the last pipeline stage logs the loss
    assert sorted(run.steps(last)) == [1, 2]
    check_step_one(run, tiny_models, "forward", rank=last)
    _loads(run.out / "student_hf" / "step-0000002")
    _loads(run.out / "final")


def test_rkl_stage_at_tp2_pp2_matches_the_reference(bridge_stage, tiny_models, tmp_path):
    run = bridge_stage(tmp_path / "tp2pp2", "rkl", nproc=4,
                       overrides=["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2",
                                  *TEACHER_SPLIT, "train.train_iters=1", "dataset.refresh_every=1000"])
    assert run.code == 0, run.log[-6000:]
    last = 2  # ranks 0, 1: first stage (TP pair); 2, 3: last stage
    assert run.steps(last)[1] == run.steps(3)[1]
    check_step_one(run, tiny_models, "reverse", rank=last)
    _loads(run.out / "final")


def test_rkl_stage_at_pp2_stopped_by_usr1_resumes_on_both_stages(bridge_stage, tmp_path):
    """A signal checkpoint at PP=2 holds each stage's layers; the restart resumes both at the signal's step,
    the first stage's data stream where it stopped, and finishes at the uninterrupted stage's last step."""
    import json
    import signal

    out = tmp_path / "pp2-resume"
    # the plain optimizer, as in test_bridge_train's TP=2 resume: the distributed one cannot reload without Apex/TE
    pp2 = ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false", "model.pipeline_model_parallel_size=2",
           *TEACHER_SPLIT, "checkpoint.save_interval=4", "optimizer.use_distributed_optimizer=false",
           "ddp.use_distributed_optimizer=false", "ddp.overlap_param_gather=false"]
    stopped = bridge_stage(out, "rkl", nproc=2, overrides=pp2, stop=(signal.SIGUSR1, 1))
    codes = [e["code"] for rank in (0, 1) for e in stopped.events("exit", rank)]
    assert stopped.code != 0 and codes and set(codes) == {75}, stopped.log[-6000:]
    done = max(stopped.steps(1))
    assert 1 <= done < 4, "the signal must land mid-stage"
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(done)
    saved = json.loads((out / "checkpoints" / "paced_sampler" / f"iter_{done:07d}.json").read_text())
    resumed = bridge_stage(out, "rkl", nproc=2, overrides=pp2)
    assert resumed.code == 0, resumed.log[-6000:]
    for rank in (0, 1):
        assert resumed.events("start", rank)[0]["step"] == done
        assert sorted(resumed.steps(rank)) == list(range(done + 1, 5))
    assert resumed.events("start", 0)[0]["stream"] == saved  # the first stage reads the data
    assert all(math.isfinite(loss["paced kl"]) for loss in resumed.steps(1).values())
    _loads(out / "final")
