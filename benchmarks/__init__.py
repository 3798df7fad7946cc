"""Benchmarks: the pool beside its peers, measured in the same run (``python -m benchmarks``)."""
