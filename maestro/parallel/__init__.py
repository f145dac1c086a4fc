"""Parallelism wrapped around the single-device model from outside: process group and DeepSpeed engine."""
