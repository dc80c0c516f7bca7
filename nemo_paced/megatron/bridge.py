"""Megatron Bridge glue: the Paced distillation provider, data source, refresh callback and entry point.

Needs Megatron Bridge (NeMo Framework containers, nvcr.io/nvidia/nemo:26.08 or later); import
this module only where Bridge is installed. The pieces, as a recipe assembles them:

- `paced_distillation_provider`: Bridge's `DistillationProvider` (teacher built frozen on the same
  ranks, same TP/PP layout, after its Hugging Face weights are loaded) with the Paced KL criterion
  installed just before ModelOpt's conversion, where the pipeline stage is known.
- `PacedDataset`: the external data source: `PacedSampler` over the problem set, drawing from the
  rollout service's pass-rate table, collated into micro-batches that keep `sample_weight`
  (teacher references in the fkl stage, fresh student samples in the rkl stage).
- `PacedCallback`: reads each step's micro-batches before the schedule runs (`data.StepBuffer`),
  and every `refresh_every` steps exports the student in Hugging Face format into a new directory
  that appears atomically, has the rollout service load it and queue a new pass-rate estimate;
  the sampler picks the refreshed table up at its next refresh boundary. It saves the data
  stream's state at every step and restores it when a job resumes (`resume`); it routes both stop
  signals to Bridge's handler and syncs parameters before each export.
- `train(config)`: `pretrain(config, config.dataset.forward_step(), callbacks=[PacedCallback()])`; says whether
  the stage finished or a stop signal ended it with a checkpoint (then `nemo-paced train` exits 75).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

try:
    from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider
    from megatron.bridge.models.distillation_provider import convert_to_distillation_provider
    from megatron.bridge.training.callbacks import Callback, CallbackContext
    from megatron.bridge.training.post_training.distillation import ModelOptDistillConfig
except ImportError as error:  # pragma: no cover - depends on the machine
    raise ImportError(
        "nemo_paced.megatron.bridge needs Megatron Bridge (megatron-bridge >= 0.6, as in the NeMo Framework "
        "container nvcr.io/nvidia/nemo:26.08); it does not install on CPU-only machines. "
        f"Original error: {error}") from error

from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from nemo_paced.batches import BatchBuilder
from nemo_paced.megatron.criterion import Stage, paced_criterion, parse_stage
from nemo_paced.megatron.data import StepBuffer, WithPassRates
from nemo_paced.megatron.publish import prepare, publish, step_dirs
from nemo_paced.megatron.resume import restore_stream, save_stream_state
from nemo_paced.megatron.self_teacher import (SelfDistillationModel, SelfDistillForwardStep, initial_copy,
                                             tensor_shapes_adjust_fn)
from nemo_paced.megatron.step import PacedForwardStep
from nemo_paced.megatron.teacher import check_frozen, check_tokenizers, check_vocab
from nemo_paced.onpolicy import OnPolicyBatches, SamplingSettings
from nemo_paced.passrates import UnknownPolicy
from nemo_paced.problems import load_problems
from nemo_paced.references import ReferenceBatches, load_references
from nemo_paced.rollout.client import RolloutClient
from nemo_paced.sampler import PacedSampler, SamplerConfig, reader_group
from nemo_paced.self_teacher import SelfTeacher, SelfTeacherConfig
from nemo_paced.weighting import WeightConfig

log = logging.getLogger(__name__)


# --- model -------------------------------------------------------------------------------------

def paced_distillation_provider(student, teacher, stage: Stage | str, temperature: float = 1.0,
                                student_tokenizer: Any = None, teacher_tokenizer: Any = None):
    """Bridge's DistillationProvider around two GPT providers (e.g. `AutoBridge...to_megatron_provider()`),
    with the Paced KL of `stage` as its only criterion and per-token loss accounting."""
    check_vocab(student.vocab_size, teacher.vocab_size)
    if student_tokenizer is not None and teacher_tokenizer is not None:
        check_tokenizers(student_tokenizer, teacher_tokenizer)
    stage = parse_stage(stage)
    kd_config = ModelOptDistillConfig()
    provider = convert_to_distillation_provider(student, teacher, kd_config)
    provider.calculate_per_token_loss = True  # the Paced step normalises by the step's weight sum itself

    def install_criterion(model_chunks: list) -> list:
        kd_config.criterion = paced_criterion(unwrap_model(model_chunks[0]).config, stage, temperature)
        return model_chunks

    # Run right before ModelOpt's convert hook, which `convert_to_distillation_provider` appends last;
    # check it is there rather than trust the position. Set the list directly: the provider mirrors
    # attribute writes to the teacher, which must not get these hooks.
    hooks = list(provider._pre_wrap_hooks)
    if not hooks or getattr(hooks[-1], "__self__", None) is not provider \
            or getattr(hooks[-1], "__name__", "") != "_convert_hook":
        raise RuntimeError("the last pre-wrap hook of Bridge's distillation provider is not its ModelOpt convert "
                           f"hook (hooks: {[getattr(h, '__name__', repr(h)) for h in hooks]}); the Paced criterion "
                           "must be installed right before that conversion")
    object.__setattr__(provider, "_pre_wrap_hooks", hooks[:-1] + [install_criterion, hooks[-1]])
    return provider


# --- data --------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class PacedDataset(DatasetProvider):
    """Bridge's external data source for Paced distillation (`dataloader_type="external"`).

    `service` is the rollout service's URL or address file. Global and micro-batch sizes are copied
    from `config.train` by `train()`, so they are set in one place.
    """

    problems: str
    service: str
    stage: str = "fkl"
    references: str | None = None  # teacher references, needed by the fkl stage
    student: str = ""  # the student's Hugging Face id or path: its tokenizer, and the config of exports
    template: str = "plain"
    seq_length: int = 8192
    max_response_tokens: int | None = None
    weighting: WeightConfig = field(default_factory=WeightConfig)
    unknown: str = UnknownPolicy.EXCLUDE.value
    seed: int = 1234
    refresh_every: int = 50
    export_dir: str = "runs/paced/student_hf"
    final_dir: str | None = None  # the student at the end of training, Hugging Face format (the next stage's init)
    dataloader_type: str = "external"
    global_batch_size: int | None = None
    micro_batch_size: int | None = None

    def build_datasets(self, context: DatasetBuildContext):
        from transformers import AutoTokenizer

        if self.global_batch_size is None or self.micro_batch_size is None:
            raise ValueError("PacedDataset batch sizes are unset; launch through nemo_paced.megatron.bridge.train")
        builder = BatchBuilder(AutoTokenizer.from_pretrained(self.student), self.seq_length)
        client = RolloutClient.connect(self.service)
        problems = load_problems(self.problems)
        fkl = parse_stage(self.stage) is Stage.FKL
        if fkl and not self.references:
            raise ValueError("the fkl stage trains on teacher references: set dataset.references")
        collate = self.reference_collate(problems, builder) if fkl else None
        # Every rank runs this (Bridge builds custom datasets on all ranks), so the groups can be made here.
        reads = _reads_data()
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        readers = reader_group(reads)
        replica = reader_group(reads, replica=dp_rank)
        config = SamplerConfig(self.global_batch_size, self.micro_batch_size, self.weighting, self.seed, self.unknown,
                               refresh_every=self.refresh_every)
        self_teacher = None if fkl else self.self_teacher_rows(problems, builder)
        ids = collate.problem_ids if fkl else self_teacher.problem_ids if self_teacher else [p.id for p in problems]
        sampler = PacedSampler(ids, config, client.refresh_table, dp_rank=dp_rank, dp_size=dp_size, group=readers,
                               collate=collate)
        self.source = sampler if fkl else OnPolicyBatches(
            sampler, client, builder, sampling=SamplingSettings(max_tokens=self.max_response_tokens), group=replica,
            self_teacher=self_teacher, teacher=self.served_teacher(builder))
        self.stream = StepBuffer(WithPassRates(self.source, client,
                                               self.refresh_every * sampler.micro_batches_per_step))
        return self.stream, None, None

    def forward_step(self) -> PacedForwardStep:
        """The forward step `train()` runs this data with; student-only variants (a teacher outside the
        job, a self-teacher) override it."""
        return PacedForwardStep()

    # What variants change (SelfDistillDataset here, bridge_frontier.TopKTeacherDataset):

    def reference_collate(self, problems: list, builder: BatchBuilder):
        """The fkl stage's collate (teacher references); variants add teacher rows."""
        return ReferenceBatches(problems, load_references(self.references), builder, self.template)

    def self_teacher_rows(self, problems: list, builder: BatchBuilder) -> SelfTeacher | None:
        """What adds the self-teacher's rows to the rkl stage's micro-batches; None: no self-teacher."""
        return None

    def served_teacher(self, builder: BatchBuilder):
        """What scores the rkl stage's samples at a teacher service (nemo_paced.teacher.served); None: none."""
        return None


@dataclass(kw_only=True)
class SelfDistillDataset(PacedDataset):
    """`PacedDataset` for self-distillation (stage rkl only): each on-policy micro-batch also carries the
    rows of the self-teacher (the student with the problem's solution or answer in its prompt,
    `nemo_paced.self_teacher`), and `train()` wraps the student in `SelfDistillationModel`
    (`self_teacher.weights`: current, or a frozen copy of the starting weights, initial).

    `teacher_seq_length` caps the teacher rows (None: the student's `seq_length` plus the longest
    extra prompt, so no response token is lost); it is rounded up to a multiple of the
    tensor-parallel size, which sequence parallelism splits the sequence over. Under pipeline
    parallelism teacher rows have the student's `seq_length` (response tokens past it leave the loss).
    """

    stage: str = Stage.RKL.value
    self_teacher: SelfTeacherConfig = field(default_factory=SelfTeacherConfig)
    teacher_seq_length: int | None = None
    temperature: float = 1.0

    def self_teacher_rows(self, problems: list, builder: BatchBuilder) -> SelfTeacher:
        from nemo_paced.problems import render_prompt

        render = lambda p: render_prompt(p, self.template, builder.tokenizer)  # noqa: E731
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # both passes' hidden states travel between stages in one tensor: one sequence length
            if self.teacher_seq_length not in (None, builder.seq_length):
                log.info("pipeline parallel: teacher rows get the student's %d positions, not teacher_seq_length %d",
                         builder.seq_length, self.teacher_seq_length)
            return SelfTeacher(problems, builder, render, self.self_teacher, builder.seq_length)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        teacher = SelfTeacher(problems, builder, render, self.self_teacher, self.teacher_seq_length)
        teacher.teacher_seq_length = -(-teacher.teacher_seq_length // tp) * tp
        return teacher

    def forward_step(self) -> SelfDistillForwardStep:
        return SelfDistillForwardStep(temperature=self.temperature)

    def model_hook(self, provider) -> Callable[[list], list]:
        """The pre-wrap hook that puts the student built by `provider` (weights loaded: run it after
        the provider's load hook) into a `SelfDistillationModel`."""
        weights = self.self_teacher.weights

        def wrap(chunks: list) -> list:
            if len(chunks) != 1:
                raise ValueError("virtual pipeline parallelism is not supported by self-distillation")
            student = chunks[0]
            initial = None
            if weights == "initial":
                def build():
                    copy = provider.provide(pre_process=student.pre_process, post_process=student.post_process)
                    copy.model_type = student.model_type
                    return copy

                initial = initial_copy(student, build)
            return [SelfDistillationModel(student, initial)]

        return wrap


# --- callback ----------------------------------------------------------------------------------

# The signals that stop a stage with a checkpoint: launch/jobs/train.sbatch forwards SIGUSR1 (time
# limit near, the job requeues itself) and SIGTERM (preemption, scancel) to every rank. Bridge's
# handler watches the one `train.exit_signal`; the callback routes the other to the same handler.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PacedCallback(Callback):
    """Checks the teacher is frozen at the start, makes both stop signals end the stage with a
    checkpoint, and puts the data stream where a resumed job continues (`resume`); before each step,
    reads the step's micro-batches on the ranks that read data (see `data.StepBuffer`); after each
    step, saves the stream's state beside the checkpoints; every `dataset.refresh_every` steps,
    exports the student (Hugging Face format) to `export_dir/step-NNNNNNN` (NNNNNNN = steps done),
    has the rollout service load it and queues a new estimate; at the end, exports the final student
    to `final_dir` and records that the stage finished (`finished`)."""

    def __init__(self) -> None:
        self.finished = False

    def on_train_start(self, context: CallbackContext) -> None:
        model = unwrap_model(context.model[0])
        if isinstance(model, SelfDistillationModel):
            model.check_frozen()
        elif hasattr(model, "teacher_model"):  # a student-only model (teacher outside the job) has none
            check_frozen(model)
        _route_stop_signals(context.state)
        if _reads_data():
            checkpoint = context.state.cfg.checkpoint
            # the directory Bridge resumed from (the recipes set load = save, so a requeued job resumes)
            restore_stream(context.state.cfg.dataset.source, checkpoint.load, context.state.train_state.step)

    def on_train_step_start(self, context: CallbackContext) -> None:
        if _reads_data():
            from megatron.core.num_microbatches_calculator import get_num_microbatches

            context.state.cfg.dataset.stream.fill(get_num_microbatches())

    def on_train_end(self, context: CallbackContext) -> None:
        dataset = context.state.cfg.dataset
        if dataset.final_dir:
            final = Path(dataset.final_dir)
            export_student(context, final.parent / f".{final.name}.partial", final)
        self.finished = True

    def on_train_step_end(self, context: CallbackContext) -> None:
        dataset, checkpoint = context.state.cfg.dataset, context.state.cfg.checkpoint
        if checkpoint.save and dist.get_rank() == 0:  # every DP replica's stream is at the same position
            save_stream_state(checkpoint.save, dataset.source.state_dict(), checkpoint.save_interval)
        done = context.state.train_state.step + 1  # Bridge increments the step after this hook
        if done % dataset.refresh_every:
            return
        final = export_student(context, *step_dirs(Path(dataset.export_dir), done))
        if dist.get_rank() == 0:
            with RolloutClient.connect(dataset.service) as client:
                client.load_weights(final, step=done)
                job = client.estimate()
            log.info("step %d: student exported to %s, rollout service reloaded, estimate job %s", done, final, job)


def _route_stop_signals(state) -> None:
    """Have every signal of STOP_SIGNALS set Bridge's stop flag (its handler exists once the config is set)."""
    if not state.cfg.train.exit_signal_handler:
        return
    handler = signal.getsignal(state.signal_handler.sig)
    for other in STOP_SIGNALS:
        if other != state.signal_handler.sig:
            signal.signal(other, handler)


def export_student(context: CallbackContext, partial: Path, final: Path) -> Path:
    """Collective: all ranks gather the student's weights (architecture and tokenizer of the dataset's
    `student`); rank 0 writes them into `partial` and publishes it as `final` atomically, so the
    rollout service never loads a half-written checkpoint."""
    from megatron.bridge import AutoBridge

    if final.exists():  # exported before a restart; it appeared whole, so keep it
        return final
    _sync_params(context)
    if dist.get_rank() == 0:
        prepare(partial)
    dist.barrier()
    bridge = AutoBridge.from_hf_pretrained(context.state.cfg.dataset.student)
    model = unwrap_model(context.model[0])
    if isinstance(model, SelfDistillationModel):  # the student, not the initial copy
        bridge.save_hf_pretrained([unwrap_model(m).student for m in context.model], partial, show_progress=False)
    else:  # ModelOpt's distillation model, or a student-only model (nothing to hide)
        with getattr(model, "hide_teacher_model", contextlib.nullcontext)(), \
                _teacher_config_kept(context.state.cfg.model), _kd_config_hidden(context.state.cfg.model):
            bridge.save_hf_pretrained(context.model, partial, show_progress=False)  # the student alone
    dist.barrier()
    if dist.get_rank() == 0:
        publish(partial, final)
    dist.barrier()
    return final


@contextlib.contextmanager
def _teacher_config_kept(provider):
    """Bridge's export strips callables from a copy of the model config (param_mapping.py:1759 ->
    conversion/utils.py:274), and the distillation provider mirrors those writes onto the teacher's
    config (distillation_provider.py:159), which the live teacher model uses: its activation_func became
    None and the next step's teacher forward failed. Put the teacher's fields back afterwards."""
    teacher = getattr(provider, "teacher", None)
    saved = dict(vars(teacher)) if teacher is not None else None
    try:
        yield
    finally:
        if teacher is not None:
            vars(teacher).update(saved)


@contextlib.contextmanager
def _kd_config_hidden(provider):
    """Under pipeline parallelism Bridge's export pickles the model config to the other stages
    (param_mapping.py:1760), stripping unpicklable objects to depth 3 only (conversion/utils.py:218);
    the distillation config is deeper: its criterion and loss balancer are modules of the live model
    (DDP's forward pre-hooks, the config itself). The export does not need it: hide it meanwhile."""
    saved = vars(provider).get("kd_config")
    if saved is not None:
        object.__setattr__(provider, "kd_config", None)  # not mirrored to the teacher
    try:
        yield
    finally:
        if saved is not None:
            object.__setattr__(provider, "kd_config", saved)


def _sync_params(context: CallbackContext) -> None:
    """With the distributed optimizer and overlapped parameter all-gather, each rank's copy of the
    parameters other DP ranks own is one step stale until the next forward; gather them now, as
    Bridge does before its own checkpoint saves."""
    from megatron.bridge.training.train import force_param_sync, should_disable_forward_pre_hook

    cfg = context.state.cfg
    if should_disable_forward_pre_hook(cfg.ddp.use_megatron_fsdp, cfg.optimizer.use_distributed_optimizer,
                                       cfg.ddp.overlap_param_gather):
        force_param_sync(context.model, optimizer=context.optimizer)


def _reads_data() -> bool:
    return parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()


# --- entry -------------------------------------------------------------------------------------

def train(config) -> bool:
    """Run a Paced recipe's ConfigContainer under torchrun/srun; True when the stage finished, False when
    a stop signal (or another of Bridge's exit conditions) ended it early with a checkpoint."""
    from megatron.bridge.training.pretrain import pretrain

    if not isinstance(config.dataset, PacedDataset):
        raise TypeError(f"config.dataset must be a PacedDataset, got {type(config.dataset).__name__}")
    config.dataset.global_batch_size = config.train.global_batch_size
    config.dataset.micro_batch_size = config.train.micro_batch_size
    if isinstance(config.dataset, SelfDistillDataset):
        if parse_stage(config.dataset.stage) is not Stage.RKL:
            raise ValueError("self-distillation trains reverse KL on the student's own samples: dataset.stage "
                             f"must be rkl, got {config.dataset.stage!r}")
        if config.model.virtual_pipeline_model_parallel_size:
            raise ValueError("virtual pipeline parallelism is not supported by self-distillation")
        config.model.register_pre_wrap_hook(config.dataset.model_hook(config.model))
    callback = PacedCallback()
    try:
        with _self_distillation_shapes():
            pretrain(config, config.dataset.forward_step(), callbacks=[callback])
    except SystemExit as stop:  # Bridge exits with status 0 after a signal-stopped stage's checkpoint
        if stop.code not in (0, None):
            raise
    return callback.finished


@contextlib.contextmanager
def _self_distillation_shapes():
    """Bridge's train step asks ModelOpt alone for the pipeline schedule's tensor-shape hook
    (megatron/bridge/training/train.py:905, imported at train.py:65), which knows only ModelOpt's
    distillation model. A SelfDistillationModel's stages exchange [student | teacher] hidden states,
    twice the width: while the stage trains, that name answers with `tensor_shapes_adjust_fn` for it."""
    from megatron.bridge.training import train as bridge_loop

    modelopt_fn = bridge_loop.get_tensor_shapes_adjust_fn_for_distillation

    def adjust_fn(model, **kwargs):
        first = model[0] if isinstance(model, list) else model
        if isinstance(unwrap_model(first), SelfDistillationModel):
            return tensor_shapes_adjust_fn(first)
        return modelopt_fn(model, **kwargs)

    bridge_loop.get_tensor_shapes_adjust_fn_for_distillation = adjust_fn
    try:
        yield
    finally:
        bridge_loop.get_tensor_shapes_adjust_fn_for_distillation = modelopt_fn
