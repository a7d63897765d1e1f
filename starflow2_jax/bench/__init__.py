"""Benchmarks behind the README's Performance table: ``python -m starflow2_jax.bench.<name>``.

Each benchmark prints exactly one JSON line on stdout (progress goes to stderr); the timing and
reporting helpers they share live in ``starflow2_jax.bench.common``.
"""
