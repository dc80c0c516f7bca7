"""Frontier teachers that do not run inside the training job.

engines   teacher scorers (hf, vllm, openai): top-k next-token log-probs along token sequences
service   the HTTP teacher service (`nemo-paced serve-teacher`), batching queued requests
client    TeacherClient, used by the cache builder and the reverse-KL stage
cache     the sharded top-k cache of teacher log-probs on references (`nemo-paced teacher-cache`)
served    the reverse-KL stage's teacher rows: on-policy samples scored at the service, laid out for the loss
"""
