"""Deployment and measurement: benchmarks (and, later, predict and export)."""
