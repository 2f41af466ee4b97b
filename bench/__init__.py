"""The benchmarks: run each from the repository root as `python -m bench.NAME` (docs/benchmarks.md); each writes
its results to bench/results/, and `python -m bench.report` turns them into bench/README.md."""
