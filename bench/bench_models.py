"""The user's step, end to end: transformers models of several families (random weights from their
configs, 8B-like dims, a few layers) served unpatched and served by kernelloop, in the regimes people
serve in, timed per step.

    python -m bench.bench_models --out docs/results                  # patched + observed, nothing deployed
    python -m bench.bench_models --out docs/results --loop-s 240     # first serve traffic beside the loop

kernelloop's column is the same model patched with `kernelloop.patch` and observed with
`kernelloop.observe(model)`, serving whatever the registry names for its keys when the timing runs:
with `--loop-s 0` nothing (the cost of being patched and observed); with `--loop-s N` the loop runs
for real beside the models (NATS and the five services), each family serves its traffic for N
seconds, and the row names what was deployed and serves (`promoted`).

A step is one forward: decode at batch B over a KV cache of --context tokens (the cache is cut back
after each step, so every step sees the same context), or a prefill of N tokens. Each step is timed
from an idle device to the end of its work (synchronize, wall clock, synchronize), as a server that
reads the next token per step sees it; unpatched and kernelloop are timed in alternating rounds and
each figure is the median step.
"""
import argparse
import inspect
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIES = {
    # model_type, and what a family needs beyond the shared dims
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {"head_dim": 128}),  # per-head q/k RMSNorm
    "mistral": ("mistral", {}),
    "phi3": ("phi3", {}),  # fused gate-up MLP and fused qkv
    "gemma": ("gemma", {"head_dim": 128}),  # x * rstd * (1 + weight)
}
DIMS = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=32064, max_position_embeddings=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2)
REGIMES = ("eager", "cuda_graph", "compile_default", "compile_reduce_overhead")


@dataclass(frozen=True)
class Phase:
    phase: str  # decode or prefill
    batch: int
    tokens: int  # new tokens per sequence in the step

    @property
    def name(self) -> str:
        return f"decode b{self.batch}" if self.phase == "decode" else f"prefill {self.tokens}"


PHASES = (Phase("decode", 1, 1), Phase("decode", 16, 1), Phase("decode", 64, 1),
          Phase("prefill", 1, 1024), Phase("prefill", 1, 4096))


def build(family: str, layers: int, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, **DIMS, **extra)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def twin(model):
    """A second instance with the same weights: one stays unpatched, one is patched."""
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        other = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    other.load_state_dict(model.state_dict())
    return other.eval()


# ---- steps --------------------------------------------------------------------------------------


def _cut(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # negative: remove that many tokens (newer transformers refuse a length)


def eager_step(model, phase: Phase, context: int):
    """A closure running one step of the phase in eager mode."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    if phase.phase == "prefill":
        ids = torch.randint(0, vocab, (phase.batch, phase.tokens), device="cuda")
        return lambda: model(ids, use_cache=False)
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, vocab, (phase.batch, context), device="cuda"), past_key_values=cache, use_cache=True)
    ids = torch.randint(0, vocab, (phase.batch, 1), device="cuda")

    def step():
        out = model(ids, past_key_values=cache, use_cache=True)
        _cut(cache, context)
        return out

    return step


def graph_step(model, phase: Phase, context: int):
    """Decode as a server replays it: a static cache and one CUDA graph per batch size, captured from
    whatever serves each op now (re-captured by the serving code when that changes)."""
    from transformers import StaticCache

    if phase.phase != "decode":
        raise NotImplementedError("prefill is not replayed from a graph here")
    vocab = model.config.vocab_size
    sized = "max_batch_size" in inspect.signature(StaticCache.__init__).parameters  # older transformers
    cache = StaticCache(config=model.config, max_cache_len=context + 1,
                        **({"max_batch_size": phase.batch} if sized else {}))
    with torch.no_grad():
        prompt = torch.randint(0, vocab, (phase.batch, context), device="cuda")
        model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(context, device="cuda"))
    ids = torch.randint(0, vocab, (phase.batch, 1), device="cuda")
    position = torch.tensor([context], device="cuda")
    # Newer static caches count their length on the device: put it back after each step, inside the
    # graph, so every replay writes the same slot (and never past the end of the cache).
    counters = [layer.cumulative_length for layer in getattr(cache, "layers", ())
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def forward():
        out = model(ids, past_key_values=cache, use_cache=True, cache_position=position,
                    position_ids=position.expand(phase.batch, 1))
        for counter in counters:
            counter.fill_(context)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        forward()
    return graph.replay


def compiled_step(model, phase: Phase, context: int, mode: str):
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    return eager_step(compiled, phase, context)


def make_step(model, regime: str, phase: Phase, context: int):
    if regime == "eager":
        return eager_step(model, phase, context)
    if regime == "cuda_graph":
        return graph_step(model, phase, context)
    return compiled_step(model, phase, context, regime.removeprefix("compile_"))


def time_steps(step, n: int) -> list[float]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def compare(steps: dict, phase: Phase, rounds: int) -> dict[str, float]:
    """Median step time of each, timed in alternating rounds so drift hits both alike."""
    per_round = 10 if phase.phase == "decode" else 3
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        time_steps(step, 5)  # warm-up: compile, autotune, allocator
    for _ in range(rounds):
        for name, step in steps.items():
            times[name] += time_steps(step, per_round)
    return {name: statistics.median(t) for name, t in times.items()}


# ---- the loop beside the models ---------------------------------------------------------------


def serve_traffic(model, phases: tuple[Phase, ...], context: int, seconds: float) -> int:
    """Serve a mix of the phases (decode mostly, a prefill every tenth step) for a while."""
    steps = [eager_step(model, p, context) for p in phases]
    decode = [s for s, p in zip(steps, phases) if p.phase == "decode"]
    prefill = [s for s, p in zip(steps, phases) if p.phase == "prefill"]
    n, end = 0, time.monotonic() + seconds
    with torch.no_grad():
        while time.monotonic() < end:
            batch = prefill if prefill and n % 10 == 9 else decode
            batch[n % len(batch)]()
            torch.cuda.synchronize()
            n += 1
    return n


def serving_now(runtime) -> list[dict]:
    """What the registry has swapped in here and still serves, per key."""
    table = runtime.dispatcher.table
    out = []
    for record in runtime.deploys:
        served = table.get(record.key)
        if served is not None and served.variant_id == record.variant_id:
            stage = getattr(served.entry, "stage", "promoted")
            out.append({"key": record.key, "variant_id": record.variant_id, "speedup": record.speedup,
                        "stage": stage})
    unique = {r["key"]: r for r in out}
    return list(unique.values())


# ---- output -------------------------------------------------------------------------------------


def write(out_dir: Path, payload: dict) -> None:
    from bench import harness

    gpu = payload["gpu"]
    slug = gpu.lower().replace(" ", "-")
    out_dir.mkdir(parents=True, exist_ok=True)
    harness.write_json(out_dir / f"models-{slug}.json", payload)
    rows = payload["rows"]
    table = harness.markdown_table(
        ["family", "regime", "phase", "batch", "tokens", "unpatched ms", "kernelloop ms", "ratio", "serving"],
        [[r["family"], r["regime"], r["phase"], r["batch"], r["tokens"],
          f"{r['unpatched_ms']:.3f}" if r.get("unpatched_ms") else "-",
          f"{r['kernelloop_ms']:.3f}" if r.get("kernelloop_ms") else "-",
          f"{r['ratio']:.3f}x" if r.get("ratio") else r.get("error", "-")[:60],
          ", ".join(f"{p['key'].split('.', 1)[1]} ({p['stage']})" for p in r.get("promoted", [])) or "nothing"]
         for r in rows])
    ok = [r["ratio"] for r in rows if r.get("ratio")]
    lines = [f"# Model step times on {gpu}", "", f"Command: `{payload['command']}`", "",
             payload["method"], "", f"torch {payload['torch']}, triton {payload['triton']}, "
             f"transformers {payload['transformers']}; {payload['layers']} layers, {payload['dtype']}, "
             f"context {payload['context']} tokens; loop beside the models: {payload['loop_s']} s per family.", "",
             "ratio = unpatched / kernelloop (above 1: kernelloop's step is faster).", "", table, ""]
    if ok:
        lines.append(f"Geometric mean of the ratio over {len(ok)} rows: {math.exp(sum(map(math.log, ok)) / len(ok)):.3f}x; "
                     f"lowest {min(ok):.3f}x, highest {max(ok):.3f}x.")
    (out_dir / f"models-{slug}.md").write_text("\n".join(lines) + "\n")
    labels = [f"{r['family']} {r['regime'][:7]} {r['phase'][:3]}{r['batch'] if r['phase'] == 'decode' else r['tokens']}"
              for r in rows if r.get("ratio")]
    harness.write_chart(out_dir / f"models-{slug}.png", labels, {"kernelloop / unpatched speed": ok},
                        f"step speed ratio on {gpu}")


def measure(family: str, regime: str, args, kernelloop) -> None:
    """One family in one regime, in a process of its own (a regime that faults the device ends only
    that process): the two models, the phases, one JSON line per row on stdout."""
    dtype = getattr(torch, args.dtype)
    runtime = kernelloop.observe(args.nats_url, state_dir=args.state)  # waits for the registry's entries
    model = build(family, args.layers, dtype)
    patched = kernelloop.patch(twin(model))
    kernelloop.observe(patched)  # hooks the model in place: a step is one forward
    try:
        for phase in PHASES:
            if regime == "cuda_graph" and phase.phase != "decode":
                continue
            if regime.startswith("compile") and phase.name not in args.compile_phases:
                continue
            row = {"family": family, "regime": regime, "phase": phase.phase, "batch": phase.batch,
                   "tokens": phase.tokens if phase.phase == "prefill" else args.context,
                   "promoted": serving_now(runtime)}
            try:
                steps = {"unpatched": make_step(model, regime, phase, args.context),
                         "kernelloop": make_step(patched, regime, phase, args.context)}
                times = compare(steps, phase, args.rounds)
                row.update(unpatched_ms=times["unpatched"], kernelloop_ms=times["kernelloop"],
                           ratio=times["unpatched"] / times["kernelloop"])
            except Exception as e:  # a phase this regime cannot serve: say why, go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                traceback.print_exc(limit=2)
            print("ROW " + json.dumps(row), flush=True)
            torch._dynamo.reset()
    finally:
        runtime.close()


def serve(family: str, args, kernelloop) -> None:
    """Serve the family's traffic, observed, beside the loop for --loop-s seconds."""
    runtime = kernelloop.observe(args.nats_url, state_dir=args.state)
    patched = kernelloop.patch(build(family, args.layers, getattr(torch, args.dtype)))
    kernelloop.observe(patched)
    try:
        n = serve_traffic(patched, PHASES, args.context, args.loop_s)
        print(f"{family}: served {n} steps beside the loop; serving {serving_now(runtime)}", flush=True)
    finally:
        runtime.close()


def child(argv: list[str], extra: list[str], label: str) -> list[dict]:
    """Run this module for one part of the work; its rows, or one row saying how it ended."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "bench.bench_models", *argv, *extra], stdout=subprocess.PIPE,
                          text=True)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        print(f"{label}: exited with {proc.returncode} after {len(rows)} rows", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.bench_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--compile-phases", nargs="+", default=["decode b16", "prefill 1024"],
                        help="phases timed under torch.compile (each is a compile per model)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--loop-s", type=float, default=0.0, help="seconds each family serves beside the loop first")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--part", nargs=2, metavar=("FAMILY", "REGIME|serve"), help=argparse.SUPPRESS)
    parser.add_argument("--nats-url", help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_models needs a CUDA device", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    import kernelloop

    if args.part:
        family, what = args.part
        serve(family, args, kernelloop) if what == "serve" else measure(family, what, args, kernelloop)
        return 0

    import transformers
    import triton

    from shared import supervisor

    gpu = torch.cuda.get_device_name()
    state = Path(tempfile.mkdtemp(prefix="kernelloop-models-"))
    services = supervisor.SERVICES if args.loop_s > 0 else ()
    loop = supervisor.start(state, services=services, auth=False)
    if services:
        loop.wait_ready()
    shared_args = ["--nats-url", loop.nats_url, "--state", str(state)]
    rows = []
    try:
        for family in args.families if args.loop_s > 0 else ():
            child(argv, [*shared_args, "--part", family, "serve"], f"{family} serving")
        for p in loop.processes.values():
            # the services' benchmark workers share the device: stopped before timing (what was
            # swapped in keeps serving; a workload never depends on the services being up)
            p.terminate()
            p.wait(30)
        for regime in args.regimes:
            for family in args.families:
                rows += child(argv, [*shared_args, "--part", family, regime], f"{family} {regime}")
    finally:
        loop.stop()
        payload = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                   "transformers": transformers.__version__, "layers": args.layers, "dtype": args.dtype,
                   "context": args.context, "loop_s": args.loop_s,
                   "command": "python -m bench.bench_models " + " ".join(argv),
                   "method": " ".join(__doc__.split("\n\n")[-1].split()), "rows": rows}
        write(args.out, payload)  # what was measured, also when a part ended early
    return 0


if __name__ == "__main__":
    sys.exit(main())
