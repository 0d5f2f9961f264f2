"""Benchmark commands (`pagedserve bench ...`): measurements, never part of the test run."""
