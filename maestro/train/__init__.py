"""Pretraining: optimizer recipe, training loop, checkpoints, metrics, the `pretrain` and `bench step` commands."""
