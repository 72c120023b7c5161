"""Benchmark harness for clustersync: ``python -m bench`` (see bench/README.md)."""
