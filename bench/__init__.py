"""Benchmarks: `python -m bench.NAME [--quick]`, printing JSON lines with a
baseline measured in the same run (this machine is shared and noisy)."""
