"""Benchmarks and the offline GPU acceptance run (`make gpu-check`, `benchmarks/gpu_check.py`)."""
