"""`make bench`: formcall measured on the local stack (BENCHMARKS.md, docs/bench-*.png)."""
