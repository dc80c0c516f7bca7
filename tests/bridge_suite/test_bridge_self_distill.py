"""The self-distillation recipe (recipes/qwen2p5_math.py) under Bridge's real `pretrain()` on a tiny Qwen2
model (Qwen2.5's Bridge model class: q/k/v bias, no q/k norm), through `nemo-paced train`: at TP=2 with
`--teacher self:initial` and `--teacher self` (current), at PP=2 with `self:initial`; and what the recipe
and `train()` refuse.

Each launch checks: finite positive losses (both TP ranks report alike), step 1's loss equal to a
single-process reference computed with transformers from the micro-batches the run read (student and
self-teacher at the starting weights), a final export that loads in transformers and holds the trained
student alone; at TP=2 also the refresh exports the rollout service reloads and, for `initial`, the
frozen copy in the run's last checkpoint still equal to the starting weights."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import StageInputs, TinyModels, TINY, run_stage, shimmed_python, start_rollout_service

pytestmark = pytest.mark.timeout(1500)

RECIPE = "qwen2p5_math_7b_self"
# A template over the toy tokenizer's characters (the default's English text is all unknown tokens here).
SHRINK = ["dataset.teacher_seq_length=null", "dataset.self_teacher.template={context}={question}"]


@pytest.fixture(scope="module")
def qwen2_student(tmp_path_factory):
    from tiny import write_qwen2

    return write_qwen2(tmp_path_factory.mktemp("qwen2") / "student", layers=2, hidden=64, seed=3)


@pytest.fixture(scope="module")
def qwen2_service(qwen2_student, stage_inputs, tmp_path_factory):
    server = start_rollout_service(qwen2_student, stage_inputs.problems,
                                   tmp_path_factory.mktemp("qwen2-service") / "state")
    yield server
    server.stop()


def _weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reference_loss(model_dir, batches: list[dict]) -> float:
    """Step 1's objective from its micro-batches, on one process with transformers in float64: the student
    scores the student rows, the same model scores the teacher rows (the self-teacher at the starting
    weights, `current` and `initial` alike), the teacher's logits are taken at `teacher_index`, and
    L = sum_x w_x l_x / sum_x w_x with l_x the token mean of KL(student || teacher) over the loss mask."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
    weighted, weight_sum = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            student = model(input_ids=batch["tokens"].long(), position_ids=batch["position_ids"].long()).logits
            teacher = model(input_ids=batch["teacher_tokens"].long(),
                            position_ids=batch["teacher_position_ids"].long()).logits
            index = batch["teacher_index"].long()
            teacher = torch.gather(teacher, 1, index[..., None].expand(-1, -1, teacher.shape[-1]))
            log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
            kl = (log_s.exp() * (log_s - log_t)).sum(-1)
            mask = batch["loss_mask"] != 0
            for row in range(kl.shape[0]):
                if mask[row].any():
                    w = float(batch["sample_weight"][row])
                    weighted += w * float(kl[row][mask[row]].mean())
                    weight_sum += w
    return weighted / weight_sum


def _checkpoint_tensors(checkpoint_dir, prefix: str) -> dict[str, torch.Tensor]:
    """The model tensors of a Bridge (torch_dist) checkpoint whose key holds `prefix`, read on one process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = checkpoint_dir.parent / f"{checkpoint_dir.name}.pt"
    FileSystemReader(str(checkpoint_dir)).read_metadata()
    dcp_to_torch_save(str(checkpoint_dir), str(out))
    state = torch.load(out, weights_only=False)
    flat = state.get("model", state)
    return {k: v for k, v in flat.items() if prefix in k and isinstance(v, torch.Tensor)}


def _run(out, weights: str, student, inputs: StageInputs, service, workdir,
         layout: tuple[str, ...] = ("model.tensor_model_parallel_size=2",)):
    models = TinyModels(teacher=f"self:{weights}" if weights != "current" else "self", student=student)
    return run_stage(out, "rkl", RECIPE, 2, [*TINY, *SHRINK, *layout], None, models, inputs, service.address,
                     init=None, workdir=workdir)


@pytest.mark.parametrize("weights", ["initial", "current"])
def test_self_distillation_at_tp2_trains_refreshes_and_exports_the_student(weights, qwen2_student, qwen2_service,
                                                                          stage_inputs, tmp_path):
    with qwen2_service.client() as client:  # every run samples from the starting student
        client.load_weights(qwen2_student, step=0)
    run = _run(tmp_path / weights, weights, qwen2_student, stage_inputs, qwen2_service, tmp_path)
    assert run.code == 0, run.log[-8000:]
    steps = run.steps()
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(math.isfinite(loss["paced kl"]) and loss["paced kl"] > 0 for loss in steps.values()), steps
    assert run.steps(1) == steps  # both TP ranks report the same reduced loss
    # Step 1: student and self-teacher are the starting model; the loss is the reference's to fp32 precision.
    batches = run.first_batches(0)
    assert all(b["teacher_tokens"].shape[1] > b["tokens"].shape[1] for b in batches)  # the context is there
    reference = _reference_loss(qwen2_student, batches)
    assert steps[1]["paced kl"] == pytest.approx(reference, rel=1e-5, abs=1e-7), (steps[1], reference)
    # Refresh exports named by the steps done; the rollout service reloaded the newest.
    exports = sorted(e["path"] for e in run.events("export"))
    assert [p.rsplit("/", 1)[1] for p in exports] == ["final", "step-0000002", "step-0000004"]
    with qwen2_service.client() as client:
        health = client.health()
    assert health["checkpoint"] == str(run.out / "student_hf" / "step-0000004") and health["step"] == 4, health
    # The final export is the trained student alone: the Qwen2 checkpoint's keys (no copy's), trained
    # weights (the initial copy holds the starting ones), the same as the last refresh export.
    final, init = _weights(run.out / "final"), _weights(qwen2_student)
    assert final.keys() == init.keys()
    assert any(not torch.equal(final[k], init[k]) for k in final)
    last = _weights(run.out / "student_hf" / "step-0000004")
    assert all(torch.equal(final[k], last[k]) for k in final)
    if weights == "initial":
        # The frozen copy is still the starting model after 4 steps (its embedding, the checkpoint's rows).
        copy = _checkpoint_tensors(run.out / "checkpoints" / "iter_0000004", "initial.")
        embedding = [v for k, v in copy.items() if k.endswith("initial.embedding.word_embeddings.weight")]
        assert len(embedding) == 1, sorted(copy)[:20]
        assert torch.equal(embedding[0], init["model.embed_tokens.weight"])
        trained = _checkpoint_tensors(run.out / "checkpoints" / "iter_0000004", "module.embedding.word_embeddings")
        assert any(torch.equal(v, final["model.embed_tokens.weight"]) for v in trained.values())


def test_recipe_takes_self_teachers_only_in_stage_rkl_without_virtual_pipelines(qwen2_student, stage_inputs,
                                                                                   tiny_models, tmp_path):
    code = f"""
from recipes import StageFiles, resolve
from nemo_paced.megatron.bridge import SelfDistillDataset, train
files = dict(init={str(qwen2_student)!r}, problems={str(stage_inputs.problems)!r}, service="http://127.0.0.1:9",
             out={str(tmp_path / "out")!r})
build = resolve("{RECIPE}")
for teacher, weights in (("self", "current"), ("self:current", "current"), ("self:initial", "initial"),
                         (None, "current")):
    config = build(stage="rkl", files=StageFiles(teacher=teacher, **files))
    assert isinstance(config.dataset, SelfDistillDataset) and config.dataset.self_teacher.weights == weights
    assert config.model.calculate_per_token_loss and not hasattr(config.model, "teacher")
    assert config.checkpoint.load == config.checkpoint.save == {str(tmp_path / "out" / "checkpoints")!r}
for stage, teacher in (("fkl", "self"), ("rkl", {str(tiny_models.teacher)!r})):
    try:
        build(stage=stage, files=StageFiles(teacher=teacher, **files))
    except ValueError as error:
        print("refused:", error)
try:
    resolve("qwen3_8b_to_1p7b")(stage="rkl", files=StageFiles(teacher="self", **files))
except ValueError as error:
    print("refused:", error)
config = build(stage="rkl", files=StageFiles(teacher="self", **files))
config.model.pipeline_model_parallel_size = config.model.virtual_pipeline_model_parallel_size = 2
try:
    train(config)
except ValueError as error:
    print("refused:", error)
"""
    out = shimmed_python(code)
    refused = [line for line in out.splitlines() if line.startswith("refused:")]
    assert len(refused) == 4, out
    assert "stage rkl, got 'fkl'" in refused[0]
    assert "--teacher self, self:current or self:initial" in refused[1]
    assert "for self-distillation (self) use the qwen2p5_math_7b_self recipe" in refused[2]
    assert "virtual pipeline parallelism is not supported by self-distillation" in refused[3]


def test_self_distillation_at_pp2_matches_the_reference_and_exports(qwen2_student, qwen2_service, stage_inputs,
                                                                    tmp_path):
    # The two passes' hidden states travel between the stages in one tensor (train()'s shape hook); teacher
    # rows then have the student's length. The student's 2 layers split 1 + 1, as does the initial copy.
    with qwen2_service.client() as client:
        client.load_weights(qwen2_student, step=0)
    run = _run(tmp_path / "pp2", "initial", qwen2_student, stage_inputs, qwen2_service, tmp_path,
               layout=("model.tensor_model_parallel_size=1", "model.pipeline_model_parallel_size=2"))
    assert run.code == 0, run.log[-8000:]
    last = run.steps(1)  # the last stage holds the loss
    assert sorted(last) == [1, 2, 3, 4]
    assert all(math.isfinite(loss["paced kl"]) and loss["paced kl"] > 0 for loss in last.values()), last
    batches = run.first_batches(1)
    assert all(b["teacher_tokens"].shape == b["tokens"].shape for b in batches)
    reference = _reference_loss(qwen2_student, batches)
    assert last[1]["paced kl"] == pytest.approx(reference, rel=1e-5, abs=1e-7), (last[1], reference)
    final, init = _weights(run.out / "final"), _weights(qwen2_student)
    assert final.keys() == init.keys()  # gathered from both stages, the student alone
    assert any(not torch.equal(final[k], init[k]) for k in final)
