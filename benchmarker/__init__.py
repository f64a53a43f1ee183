"""Compiles and runs each variant in an isolated worker process: correctness against the reference
on fresh inputs, then timing against the incumbent on every shape of the workload profile."""
