"""Speed tables outside pytest: `python -m bench.bench_ops` (needs a CUDA device)."""
