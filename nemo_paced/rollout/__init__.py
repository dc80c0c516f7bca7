"""The rollout service: student samples, verifiers and pass-rate estimation.

engines/    the inference backends (hf, vllm) behind one interface
verifiers   0/1 graders and the registry that resolves them by name or import path
estimate    the one sample-and-grade path shared by estimation, on-policy sampling and eval
service     the HTTP service (FastAPI) with its estimation job queue and persisted table
client      RolloutClient, used by trainers, callbacks and `nemo-paced estimate`
evaluate    benchmark accuracy (mean ± std over n samples)
"""

TOKEN_ENV = "NEMO_PACED_ROLLOUT_TOKEN"  # default variable holding the service's bearer token
