"""Tools run against the local stack: the benchmarks (bench/) and the chaos run (chaos.py)."""
