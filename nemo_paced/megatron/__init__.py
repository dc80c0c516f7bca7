"""PACED distillation inside megatron-core and Megatron Bridge.

- `criterion`: the Paced KL as a ModelOpt criterion on vocabulary-parallel logit shards.
- `step`: the forward step that carries each sequence's weight to the loss and normalises by the
  global weight sum of the step.
- `teacher`: the frozen teacher: compatibility checks and ModelOpt conversion for megatron-core models.
- `data`: the step's micro-batches read before the schedule runs (collectives in the data stream
  would deadlock pipeline stages inside it), and pass rates added for the report.
- `publish`: atomic publication of exported student checkpoints for the rollout service.
- `resume`: the data stream's state saved beside Megatron checkpoints and restored on resume.
- `bridge`: Megatron Bridge glue (providers, the refresh callback, the training entry); Bridge is
  imported only there (and in `bridge_frontier`), and only when called.
- `bridge_frontier`: the student-only data source for a teacher outside the job (its top-k from the
  teacher cache or the teacher service) and its `TopKTeacherStep`.

Submodules are imported explicitly (`from nemo_paced.megatron.step import PacedForwardStep`), so
importing this package stays free of megatron imports.
"""
