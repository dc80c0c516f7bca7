"""Trainers. `local` runs PACED distillation on one machine (CPU or one GPU) with Hugging Face models;
the Megatron recipe (`nemo_paced.megatron`) is the cluster path. Both use the same loss
(`nemo_paced.loss`), sampler, rollout service and two-stage schedule."""
