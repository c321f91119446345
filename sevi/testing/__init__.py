"""Tiny random models of each family, for the tests and the benchmarks."""
