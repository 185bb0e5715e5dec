"""GPU benchmarks (run as scripts from the repository root with PYTHONPATH=.)."""
