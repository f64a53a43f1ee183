"""Every catalog op on Llama-3-8B-like and 70B-like decode and prefill shapes: torch eager, torch.compile
and the best variant found by a direct search of the op's SPACE, with each time's share of the
roofline (the copy bandwidth and the matmul rate measured in the same run).

    python -m bench.bench_ops --out docs/results          # needs a CUDA device

Method: the search's points compile and pass benchmarker.check (odd shapes, every element, NaN
and Inf fail) in worker processes, in parallel, while the parent compiles torch.compile's versions;
then, with the workers gone, the parent screens the passing points (10 reps each) and times eager,
torch.compile and the fastest point interleaved (60 reps), L2 flushed before every call,
device events around it, medians reported. torch.compile is given every shape statically
(dynamic=False, default mode), its best case.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench import harness
from shared import hardware
from shared.ops import get_op, torch_dtype

# hidden, intermediate, heads, head_dim of the two model sizes
L8B = dict(hidden=4096, inter=14336, heads=32, head_dim=128, vocab=128256)
L70B = dict(hidden=8192, inter=28672, heads=64, head_dim=128, vocab=128256)


def suite() -> list[dict]:
    """(op, shape, seed) rows; seed 1 picks the GPT-J layout for rotary (make_inputs' parity)."""
    rows = []

    def add(op, shape, seed=0, note=""):
        rows.append({"op": op, "shape": shape, "seed": seed, "note": note})

    for m in (L8B, L70B):
        h = m["hidden"]
        for t in (1, 32, 2048):
            add("rmsnorm", [t, h])
            add("rmsnorm_residual", [t, h])
    add("rmsnorm", [4096, 4096])
    for t in (1, 32, 2048):
        add("layernorm", [t, 4096])
    add("layernorm", [2048, 8192])
    for t in (1, 8, 32, 2048):
        add("silu_and_mul", [t, 2 * L8B["inter"]])
    for t in (32, 2048):
        add("silu_and_mul", [t, 2 * L70B["inter"]])
    add("softmax", [8, 28672])
    add("softmax", [1, L8B["vocab"]])
    add("softmax", [32, L8B["vocab"]])
    add("softmax", [1024, 2048], note="attention scores")
    add("softmax", [4, 131072], note="128k row")
    for t in (1, 32, 2048):
        add("rotary", [t, 32, 128], 0, "NeoX")
    add("rotary", [2048, 32, 128], 1, "GPT-J")
    add("rotary", [2048, 64, 128], 0, "NeoX")
    # matmul [M, N, K]: 8B qkv, o, gate_up, down; 70B gate_up, down
    layers8 = [(6144, 4096), (4096, 4096), (2 * 14336, 4096), (4096, 14336)]
    for n, k in layers8:
        add("matmul", [1, n, k], note="decode")
    add("matmul", [1, 11008, 4096], note="decode")
    for n, k in [(2 * 14336, 4096), (4096, 14336)]:
        add("matmul", [16, n, k], note="decode")
    for n, k in [(2 * 28672, 8192), (8192, 28672)]:
        add("matmul", [1, n, k], note="decode 70B")
    add("matmul", [32, 10240, 8192], note="decode 70B")
    for n, k in layers8:
        add("matmul", [2048, n, k], note="prefill")
    add("matmul", [4096, 8192, 8192], note="prefill 70B")
    return rows


def _eager(op):
    return getattr(op, "eager", op.reference)


def _limit_recompiles() -> None:
    # every row is a new static shape of the same function: keep dynamo from falling back to eager
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)


def run(rows: list[dict], dtype: str, n_candidates: int, workers: int, budget_s: float, check_s: float,
        log) -> list[dict]:
    t_start = time.monotonic()
    executor = harness.pool(workers)
    for row in rows:
        row["points"] = harness.candidates(row["op"], [row["shape"]], n_candidates)
        row["futures"] = harness.submit_checks(executor, row["op"], row["points"], row["shape"], dtype, seed=7)
    # meanwhile: torch.compile's version of each row, compiled here (the workers only check)
    _limit_recompiles()
    for row in rows:
        op = get_op(row["op"])
        row["compiled"] = torch.compile(_eager(op), dynamic=False)
        args = op.make_inputs(row["shape"], torch_dtype(dtype), "cuda", row["seed"])
        try:
            row["compiled"](*args)
        except Exception as e:
            row["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        del args
    log(f"torch.compile warm-up done at {time.monotonic() - t_start:.0f} s; waiting for the variant checks")
    flat = [f for row in rows for f in row["futures"]]
    checked = iter(harness.results(executor, flat, t_start + check_s))
    for row in rows:
        row["checked"] = [next(checked) for _ in row["futures"]]
    log(f"variants compiled and checked at {time.monotonic() - t_start:.0f} s")
    torch.cuda.empty_cache()

    out = []
    for row in rows:
        if time.monotonic() - t_start > budget_s:
            log(f"budget of {budget_s:.0f} s spent: {len(rows) - len(out)} rows left out")
            break
        try:
            out.append(_time_row(row, dtype, log))
        except Exception as e:  # one row's failure is reported, the others still run
            log(f"{row['op']} {row['shape']}: timing failed: {type(e).__name__}: {e}")
            out.append({"op": row["op"], "shape": row["shape"], "dtype": dtype, "note": row["note"],
                        "error": f"{type(e).__name__}: {str(e)[:300]}", "eager_us": None, "compile_us": None,
                        "kernelloop_us": None})
    return out


def _time_row(row: dict, dtype: str, log) -> dict:
    op = get_op(row["op"])
    args = op.make_inputs(row["shape"], torch_dtype(dtype), "cuda", row["seed"])
    passed = [p for p, (ok, _) in zip(row["points"], row["checked"]) if ok]
    failures = [f"{p}: {msg}" for p, (ok, msg) in zip(row["points"], row["checked"]) if not ok]
    result = {"op": row["op"], "shape": row["shape"], "dtype": dtype, "note": row["note"],
              "candidates": len(row["points"]), "passed": len(passed), "failures": failures[:3]}
    fns = [harness.load(row["op"], p) for p in passed]
    if not fns:
        log(f"{row['op']} {row['shape']}: no candidate passed; first failures: {failures[:2]}")
        return result | {"eager_us": None, "compile_us": None, "kernelloop_us": None}
    best, _ = harness.best_of(fns, args)
    compiled = row["compiled"] if "compile_error" not in row else _eager(op)
    eager_t, compile_t, best_t = harness.final_times([_eager(op), compiled, fns[best]], args)
    cost = op.cost(row["shape"], torch_dtype(dtype))
    result.update(eager_us=eager_t["us"], compile_us=compile_t["us"], kernelloop_us=best_t["us"],
                  eager_iqr_us=eager_t["iqr_us"], compile_iqr_us=compile_t["iqr_us"],
                  kernelloop_iqr_us=best_t["iqr_us"], best_params=passed[best],
                  flops=cost.flops, bytes_moved=cost.bytes_moved, compile_error=row.get("compile_error"))
    log(f"{row['op']:>16} {str(row['shape']):>20} eager {eager_t['us']:9.1f} compile {compile_t['us']:9.1f} "
        f"kernelloop {best_t['us']:9.1f} us  ({len(passed)}/{len(row['points'])} passed)")
    return result


def add_rooflines(rows: list[dict], copy_gbps: float, tflops: float) -> None:
    for r in rows:
        if r.get("kernelloop_us") is None:
            r.update(bound=None, roofline_fraction=None)
            continue
        mem_us = r["bytes_moved"] / (copy_gbps * 1e9) * 1e6
        cmp_us = r["flops"] / (tflops * 1e12) * 1e6
        r["bound"] = "memory" if mem_us >= cmp_us else "compute"
        floor = max(mem_us, cmp_us)
        r["floor_us"] = floor
        r["roofline_fraction"] = floor / r["kernelloop_us"]
        r["eager_roofline_fraction"] = floor / r["eager_us"]
        r["speedup_vs_eager"] = r["eager_us"] / r["kernelloop_us"]
        r["speedup_vs_compile"] = r["compile_us"] / r["kernelloop_us"]
        # what the loop would serve: the variant only where it beats eager, else eager stays
        r["deployed_us"] = min(r["kernelloop_us"], r["eager_us"])


def summarise(rows: list[dict]) -> dict:
    timed = [r for r in rows if r.get("kernelloop_us")]
    big_mem = [r for r in timed if r["bound"] == "memory" and r["op"] != "matmul" and r["bytes_moved"] >= 16e6]
    mm = [r for r in timed if r["op"] == "matmul"]
    return {
        "geomean_speedup_vs_eager": harness.geomean([r["speedup_vs_eager"] for r in timed]),
        "geomean_speedup_vs_compile": harness.geomean([r["speedup_vs_compile"] for r in timed]),
        "geomean_deployed_speedup_vs_eager": harness.geomean([r["eager_us"] / r["deployed_us"] for r in timed]),
        "rows_slower_than_eager": [f"{r['op']} {r['shape']}" for r in timed if r["speedup_vs_eager"] < 1.0],
        "memory_bound_ge_16MB_copy_fraction_min": min((r["roofline_fraction"] for r in big_mem), default=None),
        "memory_bound_ge_16MB_copy_fraction_geomean": harness.geomean([r["roofline_fraction"] for r in big_mem]),
        "memory_bound_ge_16MB_speedup_vs_compile_geomean": harness.geomean([r["speedup_vs_compile"] for r in big_mem]),
        "matmul_prefill_vs_cublas_min": min((r["speedup_vs_eager"] for r in mm if r["shape"][0] >= 1024), default=None),
        "matmul_decode_m16_vs_cublas_min": min((r["speedup_vs_eager"] for r in mm if r["shape"][0] <= 16), default=None),
        "matmul_decode_m16_vs_cublas_geomean": harness.geomean([r["speedup_vs_eager"] for r in mm if r["shape"][0] <= 16]),
    }


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def write_results(out_dir: Path, payload: dict, log) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"ops-{hardware.slug(payload['gpu'])}"
    harness.write_json(out_dir / f"{stem}.json", payload)
    rows = payload["rows"]
    table = [[r["op"] + (f" ({r['note']})" if r.get("note") else ""), "x".join(map(str, r["shape"])), r["dtype"],
              r.get("bound") or "-", _fmt(r.get("eager_us")), _fmt(r.get("compile_us")), _fmt(r.get("kernelloop_us")),
              _fmt(r.get("speedup_vs_eager"), ".2f"), _fmt(r.get("speedup_vs_compile"), ".2f"),
              _fmt(None if r.get("roofline_fraction") is None else 100 * r["roofline_fraction"], ".0f"),
              f"{r.get('passed', 0)}/{r.get('candidates', 0)}",
              " ".join(f"{k}={v}" for k, v in (r.get("best_params") or {}).items())] for r in rows]
    s = payload["summary"]
    md = [f"# kernelloop ops on {payload['gpu']}\n",
          f"Command: `{payload['command']}`  ",
          f"torch {payload['torch']}, triton {payload['triton']}; copy {payload['copy_gbps']:.0f} GB/s (read + write), "
          f"bf16 matmul {payload['matmul_tflops']:.0f} TFLOP/s, both measured in this run.  ",
          "Times are medians in µs (L2 flushed before every call, device events); kernelloop = the fastest "
          "checked point of the op's SPACE; roofline = floor time (bytes / copy bandwidth or FLOPs / matmul "
          "rate, the larger) over kernelloop's time; torch.compile gets each shape statically (dynamic=False).\n",
          harness.markdown_table(["op", "shape", "dtype", "bound", "eager", "compile", "kernelloop", "vs eager",
                                  "vs compile", "roofline %", "passed", "best point"], table),
          "## Summary\n",
          harness.markdown_table(["measure", "value"], [[k, _fmt(v, ".3f") if isinstance(v, float) else v]
                                                       for k, v in s.items()])]
    if payload.get("dispatch"):
        md += ["## Dispatch overhead (host µs per call, rmsnorm 1x4096 bf16, deployed variant)\n",
               harness.markdown_table(["path", "µs per call"], [[k, _fmt(v, ".2f") if isinstance(v, float) else v]
                                                                 for k, v in payload["dispatch"].items()])]
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    timed = [r for r in rows if r.get("kernelloop_us")]
    labels = [f"{r['op']} {'x'.join(map(str, r['shape']))}" for r in timed]
    writer = harness.write_chart(out_dir / f"{stem}.png", labels,
                                 {"vs torch eager": [r["speedup_vs_eager"] for r in timed],
                                  "vs torch.compile": [r["speedup_vs_compile"] for r in timed]},
                                 f"kernelloop best variant speedup, {payload['gpu']}")
    log(f"wrote {out_dir}/{stem}.json, .md, .png ({writer} chart)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--ops", nargs="*", help="only these ops")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--candidates", type=int, default=20, help="SPACE points per row besides DEFAULT")
    parser.add_argument("--workers", type=int, default=10, help="processes that compile and check variants")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop timing new rows after this")
    parser.add_argument("--check-s", type=float, default=240.0, help="deadline for compiling and checking variants")
    parser.add_argument("--no-dispatch", action="store_true", help="skip the dispatch-overhead measurement")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_ops needs a CUDA device (the interpreter's times say nothing about a GPU)")

    def log(msg: str) -> None:
        print(msg, flush=True)

    rows = [r for r in suite() if not args.ops or r["op"] in args.ops]
    gpu = torch.cuda.get_device_name()
    copy, tflops = harness.copy_gbps(), harness.matmul_tflops()
    log(f"{gpu}: copy {copy:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s; {len(rows)} rows")
    results = run(rows, args.dtype, args.candidates, args.workers, args.budget_s, args.check_s, log)
    add_rooflines(results, copy, tflops)
    payload = {"gpu": gpu, "copy_gbps": copy, "matmul_tflops": tflops, "torch": torch.__version__,
               "triton": __import__("triton").__version__,
               "command": "python -m bench.bench_ops " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": results, "summary": summarise(results)}
    log(json.dumps(payload["summary"], indent=1))
    write_results(args.out, payload, log)
    if not args.no_dispatch:
        from bench.dispatch_overhead import measure

        best = next((r["best_params"] for r in results if r["op"] == "rmsnorm" and r["shape"] == [1, 4096]
                     and r.get("best_params")), None)
        try:
            payload["dispatch"] = measure(best)
        except Exception as e:
            payload["dispatch"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        log(json.dumps(payload["dispatch"], indent=1))
        write_results(args.out, payload, log)


if __name__ == "__main__":
    main()
