"""The GPU check of benchmarks/gpu_check.py: correctness (check.py) and timing (timing.py)."""
