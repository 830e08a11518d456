"""Benchmark cases: one module per real model (NAME, KIND, METRIC, prepare(cache_dir) -> harness.Case).
Modules whose name starts with an underscore are helpers, not cases."""
