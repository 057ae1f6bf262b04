"""What every benchmark shares, kept free of pytest so that tests/test_benchmark_stats.py can check it:

- :mod:`harness.timing`: interleaved rounds, the stopping rule, median / IQR and significance.
- :mod:`harness.peaks`: this machine's peak rates, measured once and cached with its identity.
- :mod:`harness.report`: the limit of a case and the one compact table per run.

benchmarks/conftest.py builds the ``bench`` fixture on top of them (see docs/benchmarks.md).
"""
