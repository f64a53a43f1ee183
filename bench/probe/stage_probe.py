"""Where a benchmark's wall time goes on a GPU: worker start-up, compile, check and time, per variant."""
import sys
import tempfile
import time
from pathlib import Path

from benchmarker import worker
from shared import hardware
from shared.ops import get_op
from shared.schemas import Campaign, Incumbent, KernelKey, VariantReady, WeightedShape
from shared.variants import render, variant_id


def variant(op_name, shape, params, i):
    op = get_op(op_name)
    source = render(op.TEMPLATE, params)
    key = KernelKey(hardware=hardware.fingerprint().key, op=op_name, dtype="bfloat16", bucket=op.shape_bucket(shape))
    campaign = Campaign(key=key, profile=[WeightedShape(shape=shape, weight=1.0)], incumbent=Incumbent())
    return VariantReady(campaign=campaign, variant_id=variant_id(source, params), source=source, params=params,
                        strategy="grid", round=0, round_size=1)


def main():
    worker.prepare()
    cache = Path(tempfile.mkdtemp())
    from shared.ops import matmul, rmsnorm
    cases = [("rmsnorm", [16, 4096], dict(rmsnorm.DEFAULT)), ("rmsnorm", [16, 4096], {"BLOCK": 4096, "ROWS": 1, "num_warps": 8}),
             ("rmsnorm", [16, 4096], {"BLOCK": 8192, "ROWS": 2, "num_warps": 8}),
             ("matmul", [1, 4096, 4096], matmul.SEEDS[0]), ("matmul", [1, 4096, 4096], matmul.SEEDS[2])]
    for i, (op, shape, params) in enumerate(cases):
        stages = []
        t0 = time.monotonic()
        result = worker.benchmark(variant(op, shape, params, i), reps=int(sys.argv[1]) if len(sys.argv) > 1 else 20,
                                  timeout_s=120, cache_dir=cache, on_stage=stages.append)
        total = time.monotonic() - t0
        parts = {s.name + ("" if s.name != "time" else ""): (s.end_ns - s.start_ns) / 1e9 for s in stages}
        print(f"{op} {shape} {params}: {result.status} {result.weighted_speedup} total {total:.2f} s; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
              + f"; outside stages {total - sum(parts.values()):.2f} s", flush=True)


if __name__ == "__main__":
    main()
