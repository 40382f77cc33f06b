"""Benchmarks of sb3_dreamer: DreamerV2 beside SB3 DQN (learning curves) and throughput/memory.

Run the scripts as modules from the repository root (``python -m benchmarks.learning``, ``python -m benchmarks.report``,
``python -m benchmarks.throughput``); see ``benchmarks/README.md``.
"""
