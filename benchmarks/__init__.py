"""
The benchmark suite: edgeproxy against nginx and HAProxy in the same run.

Run it with C{python benchmarks/run.py}; see C{benchmarks/README.rst} and
C{docs/performance.rst}.  CI does not run the benchmarks; the smoke test
(C{tests/test_benchmark_smoke.py}) runs them with tiny durations so that the
harness cannot rot.
"""
