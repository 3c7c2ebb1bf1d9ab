"""Benchmarks and GPU measurement scripts (run on a CUDA machine)."""
