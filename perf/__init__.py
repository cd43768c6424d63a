"""Performance harness and micro-benchmarks (``python -m perf.harness``; ``pytest perf/ --benchmark-only``).

Timings live here and never in ``tests/``.
"""
