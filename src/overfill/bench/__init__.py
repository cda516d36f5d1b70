"""Benchmarks: prefill/decode latency of each mode side by side, as in the paper's Figures 3-5 (`overfill bench`)."""

from overfill.bench.config import BenchConfig
from overfill.bench.run import run_bench

__all__ = ["BenchConfig", "run_bench"]
