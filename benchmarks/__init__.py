"""Benchmarks: speed measured as side-by-side ratios in one run, written as JSON + markdown (+ plots).

Run ``python -m benchmarks --help``. Nothing here is a test: timings on shared machines are noisy, so
every figure that matters is a ratio of two measurements interleaved in the same process.
"""
