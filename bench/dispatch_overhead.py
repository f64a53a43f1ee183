"""Host cost of kernelloop's dispatch on a decode-sized rmsnorm ([1, 4096] bf16), whose kernel is
shorter than any of these paths, so the host's time per call is what is measured: the op's fallback
and a deployed variant, called directly, through the dispatcher, through ops.rmsnorm and through the
`kernelloop::<op>` custom op; and a patched transformers LlamaRMSNorm against the unpatched one, with
nothing deployed (it runs its original) and with the variant deployed. Each of these plain and while
observed: calls counted per signature, a key's first calls then one in the dispatcher's
sample_every timed with device events. Configurations take turns in rounds, so drift on a shared host
hits them alike. Also checks that the custom op works inside a CUDA graph capture and under
torch.compile(fullgraph=True).

    python -m bench.dispatch_overhead                   # needs a CUDA device
    python -m bench.dispatch_overhead --device cpu      # a dry run: torch's rms_norm stands in for the
                                                        # variant, the interpreted fallback is left out
"""
import json
import statistics
import sys
import time

import torch

from bench import harness
from observer.sdk import customops, ops, patch, unpatch
from observer.sdk.dispatch import Served
from shared.ops import get_op
from shared.schemas import RegistryEntry
from shared.windows import WindowAggregator

SHAPE = [1, 4096]


def _per_call_us(fn, args: tuple, calls: int, sync) -> float:
    for _ in range(50):
        fn(*args)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def _patched_norm(device: str, dtype: torch.dtype):
    """transformers' LlamaRMSNorm (what patch() swaps in a served model), unpatched and patched."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return None, None
    plain = LlamaRMSNorm(SHAPE[-1], eps=1e-6).to(device, dtype)
    model = torch.nn.Sequential(LlamaRMSNorm(SHAPE[-1], eps=1e-6)).to(device, dtype)
    patch(model)
    return plain, model


def measure(params: dict | None = None, device: str = "cuda", calls: int = 3000, rounds: int = 5) -> dict:
    op = get_op("rmsnorm")
    params = params or op.DEFAULT
    source, vid = harness.source_of("rmsnorm", params)
    # on the CPU the interpreter would time itself: torch's rms_norm stands in for the variant there
    launch = harness.load("rmsnorm", params) if device == "cuda" else op.eager
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x, w = op.make_inputs(SHAPE, torch.bfloat16, device, seed=0)
    eps = 1e-6
    table = customops.dispatcher  # the SDK's one dispatch table, which ops.rmsnorm calls
    key = table.key("rmsnorm", "bfloat16", op.shape_bucket(SHAPE))
    entry = RegistryEntry(variant_id=vid, source=source, params=params, speedup=1.0, campaign_id="bench",
                          approved_by="bench")
    served = Served(vid, launch, entry)
    window = WindowAggregator(table.hardware, "bench", start=time.time())
    plain_norm, patched_norm = _patched_norm(device, torch.bfloat16)
    # name -> (variant deployed, observed, fn, args)
    paths = {} if device != "cuda" else {  # the CPU's fallback is the interpreted kernel: left out there
        "the op's fallback called directly": (False, False, table.fallback("rmsnorm", device), (x, w, eps)),
        "ops.rmsnorm, nothing deployed": (False, False, ops.rmsnorm, (x, w, eps)),
        "ops.rmsnorm, nothing deployed, observed": (False, True, ops.rmsnorm, (x, w, eps)),
    }
    paths |= {
        "variant launched directly": (True, False, launch, (x, w, eps)),
        "Dispatcher.call": (True, False, lambda *a: table.call("rmsnorm", *a), (x, w, eps)),
        "ops.rmsnorm (eager: straight to the dispatcher)": (True, False, ops.rmsnorm, (x, w, eps)),
        "torch.ops.kernelloop.rmsnorm (the torch.library op, as compiled graphs call it)":
            (True, False, ops.rmsnorm.custom_op, (x, w, eps)),
        "ops.rmsnorm, observed": (True, True, ops.rmsnorm, (x, w, eps)),
    }
    if plain_norm is not None:
        paths |= {
            "transformers LlamaRMSNorm, unpatched": (False, False, plain_norm, (x,)),
            "patched LlamaRMSNorm, nothing deployed (runs the original)": (False, False, patched_norm, (x,)),
            "patched LlamaRMSNorm, nothing deployed, observed": (False, True, patched_norm, (x,)),
            "patched LlamaRMSNorm, variant deployed": (True, False, patched_norm, (x,)),
            "patched LlamaRMSNorm, variant deployed, observed": (True, True, patched_norm, (x,)),
        }
    per_call: dict[str, list[float]] = {name: [] for name in paths}
    try:
        with torch.no_grad():
            for _ in range(rounds):
                for name, (deployed, observed, fn, args) in paths.items():
                    if deployed:
                        table.install(key, served)
                    else:
                        table.remove(key)
                    table.windows = window if observed else None
                    per_call[name].append(_per_call_us(fn, args, calls, sync))
        table.windows = None
        table.resolve_timings()
        table.install(key, served)
        graph_ok = _graph_replays(x, w, eps, launch) if device == "cuda" else None
        compiled_ok = _compiled_matches(x, w, eps, launch) if device == "cuda" else None
    finally:
        table.remove(key)
        table.windows = None
        if patched_norm is not None:
            unpatch(patched_norm)
    result = {name: statistics.median(times) for name, times in per_call.items()}
    direct, dispatched = result["variant launched directly"], result["ops.rmsnorm (eager: straight to the dispatcher)"]
    result |= {"sample_every (observed paths)": table.sample_every,
               "dispatch overhead over direct (ops.rmsnorm)": dispatched - direct,
               "dispatch overhead over direct (observed)": result["ops.rmsnorm, observed"] - direct}
    if plain_norm is not None:
        result["patched over unpatched LlamaRMSNorm, nothing deployed, observed"] = (
            result["patched LlamaRMSNorm, nothing deployed, observed"] / result["transformers LlamaRMSNorm, unpatched"])
    return result | {"CUDA graph capture and replay match": graph_ok,
                     "torch.compile(fullgraph=True) matches": compiled_ok}


def _graph_replays(x, w, eps, launch) -> bool:
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            ops.rmsnorm(static_x, w, eps)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.rmsnorm(static_x, w, eps)
    static_x.copy_(x * 0.5 + 1.0)
    graph.replay()
    torch.cuda.synchronize()
    return bool(torch.equal(y, launch(static_x, w, eps)))


def _compiled_matches(x, w, eps, launch) -> bool:
    fn = torch.compile(lambda a, b: ops.rmsnorm(a, b, eps) * 2.0, fullgraph=True)
    return bool(torch.equal(fn(x, w), launch(x, w, eps) * 2.0))


def main() -> None:
    import argparse
    from pathlib import Path

    from shared import hardware

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops-json", type=Path, help="take rmsnorm 1x4096's best point from bench_ops' JSON")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run of every path, without CUDA graphs or torch.compile")
    parser.add_argument("--calls", type=int, default=3000, help="calls per path and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write dispatch-<gpu>.json and .md here")
    args = parser.parse_args()
    params = None
    if args.ops_json:
        rows = json.loads(args.ops_json.read_text())["rows"]
        params = next((r["best_params"] for r in rows if r["op"] == "rmsnorm" and r["shape"] == SHAPE), None)
    result = measure(params, args.device, args.calls, args.rounds)
    print(json.dumps(result, indent=1))
    if args.out:
        gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        stem = f"dispatch-{hardware.slug(gpu)}"
        args.out.mkdir(parents=True, exist_ok=True)
        harness.write_json(args.out / f"{stem}.json", {"gpu": gpu, "shape": SHAPE, "params": params, **result})
        table = [[k, f"{v:.2f}" if isinstance(v, float) else v] for k, v in result.items()]
        cmd = "python -m bench.dispatch_overhead " + " ".join(sys.argv[1:])
        (args.out / f"{stem}.md").write_text(
            f"# Dispatch overhead on {gpu}\n\nCommand: `{cmd}`  \nHost µs per call, rmsnorm {SHAPE} bf16, "
            f"median of {args.rounds} rounds of {args.calls} calls, the paths taking turns.\n\n"
            + harness.markdown_table(["path", "µs per call"], table))


if __name__ == "__main__":
    main()
