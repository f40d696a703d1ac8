"""Benchmarks: timing and peak-memory measurement, and the CPU scaling sweep."""
