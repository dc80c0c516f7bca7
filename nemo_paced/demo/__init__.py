"""`nemo-paced demo`: PACED against its baselines on a synthetic verifiable task, on one machine."""
