"""torchrun entry of the Bridge suite: `nemo-paced train ARGS...` with the CPU shims and CPU settings.

Runs the real command line (recipe builder, file options, overrides, Bridge's `pretrain()` through
`nemo_paced.cli.train.run`, its exit status) with two test-only additions on a CPU: `shims.apply()`
before anything imports Megatron Bridge, and `cpu_settings` applied to the built config (megatron-core's
local layer spec instead of Transformer Engine's, fp32, no fusions, gloo). With BRIDGE_SUITE_GPU=1
(bench/gpu_smoke.sh) neither: the recipe runs as built, on CUDA with NCCL. Every rank appends what it
saw to $BRIDGE_SUITE_RECORD (JSON lines): each step's loss and gradient norm, the model sizes built,
the exports made; the micro-batches of the run's first step go beside it (`batches_path`), for the
loss parity test's reference.
"""

from __future__ import annotations

import json
import os
import sys


def record(**row) -> None:
    import torch.distributed as dist

    path = os.environ.get("BRIDGE_SUITE_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"rank": dist.get_rank() if dist.is_initialized() else 0, **row}) + "\n")


def batches_path(record_path: str, rank: int) -> str:
    """Where `rank` saves the micro-batches it read for the run's first step (torch.save of a list of dicts)."""
    return f"{record_path}.batches-rank{rank}.pt"


def cpu_settings(config) -> None:
    """What a CPU run changes in a recipe's ConfigContainer; everything else stays the recipe's."""
    import functools

    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = config.model
    # gpt_provider.py:120-125 picks Transformer Engine layers otherwise; Qwen3 normalises q and k.
    model.transformer_layer_spec = functools.partial(_local_spec, get_gpt_layer_local_spec)
    for name in ("bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
                 "apply_rope_fusion", "gradient_accumulation_fusion", "cross_entropy_loss_fusion"):
        setattr(model, name, False)
    model.sequence_parallel = False  # megatron-core's torch norms refuse it (torch_norm.py:50); TE's take it
    model.bf16 = model.fp16 = False
    model.params_dtype = model.pipeline_dtype = torch.float32
    model.autocast_dtype = torch.float32
    config.mixed_precision = None
    config.optimizer.bf16 = config.optimizer.fp16 = False
    config.optimizer.params_dtype = torch.float32
    config.dist.distributed_backend = "gloo"
    config.scheduler.start_weight_decay = config.scheduler.end_weight_decay = config.optimizer.weight_decay
    config.checkpoint.async_save = False
    config.logger.log_interval = 1
    config.logger.tensorboard_dir = None
    config.rerun_state_machine.check_for_nan_in_loss = False


def _local_spec(get_spec, provider, vp_stage=None):
    return get_spec(qk_layernorm=provider.qk_layernorm)  # Qwen3 normalises q and k, Qwen2 does not


def _instrument() -> None:
    """Record each step's loss, the built vocabulary sizes and every export, through the real callback."""
    from nemo_paced.megatron import bridge

    callback = bridge.PacedCallback
    step_end, train_start, export = callback.on_train_step_end, callback.on_train_start, bridge.export_student
    step_start = callback.on_train_step_start

    def on_train_start(self, context):
        from megatron.core.utils import unwrap_model

        model = unwrap_model(context.model[0])
        student_rows = model.embedding.word_embeddings.weight.shape[0] if hasattr(model, "embedding") else None
        teacher = model._teacher_model if hasattr(model, "_teacher_model") else None
        train_start(self, context)  # the data stream is restored here on resume
        record(event="start", step=context.state.train_state.step, student_vocab=context.state.cfg.model.vocab_size,
               teacher_vocab=getattr(getattr(context.state.cfg.model, "teacher", None), "vocab_size", None),
               student_rows=student_rows,
               teacher_rows=(teacher.embedding.word_embeddings.weight.shape[0]
                             if hasattr(teacher, "embedding") else None),  # no teacher, or the last pipeline stage
               stream=context.state.cfg.dataset.source.state_dict())

    def on_train_step_start(self, context):
        step_start(self, context)  # reads the step's micro-batches into the buffer on the ranks that read data
        path = os.environ.get("BRIDGE_SUITE_RECORD")
        buffer = getattr(context.state.cfg.dataset, "stream", None)
        if path and buffer is not None and not getattr(self, "_batches_saved", False):
            import torch
            import torch.distributed as dist

            torch.save(list(buffer._batches), batches_path(path, dist.get_rank()))
            self._batches_saved = True

    def on_train_step_end(self, context):
        loss = {key: float(value) for key, value in (context.loss_dict or {}).items()}
        grad_norm = None if context.grad_norm is None else float(context.grad_norm)
        record(event="step", step=context.state.train_state.step, loss=loss, grad_norm=grad_norm)
        step_end(self, context)

    def export_student(*args):  # (context, partial, final); older trees passed other leading arguments
        out = export(*args)
        step = args[0].state.train_state.step if hasattr(args[0], "state") else None
        record(event="export", step=step, path=str(args[-1]))
        return out

    callback.on_train_start, callback.on_train_step_end = on_train_start, on_train_step_end
    callback.on_train_step_start = on_train_step_start
    bridge.export_student = export_student


def main(argv: list[str]) -> int:
    gpu = os.environ.get("BRIDGE_SUITE_GPU") == "1"  # bench/gpu_smoke.sh: the recipe as it is, NCCL, no shims
    if not gpu:
        import shims

        shims.apply()
        import torch.distributed as dist

        dist.init_process_group("gloo")  # before Bridge, which then skips its CUDA device set-up
    import nemo_paced.cli.train as train_cli
    from nemo_paced.cli import main as cli_main

    run = train_cli.run

    def cpu_run(config):
        cpu_settings(config)
        return run(config)

    if not gpu:
        train_cli.run = cpu_run
    _instrument()
    code = cli_main(["train", *argv])
    record(event="exit", code=code)
    return code


if __name__ == "__main__":  # the guard matters: torch_dist checkpoint workers re-import this module
    sys.exit(main(sys.argv[1:]))
