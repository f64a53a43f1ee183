"""One decode step (batch 1 and 32, 1k tokens of context) and one 2k-token prefill of the Llama-style
stack (observer/demos/llama.py, Llama-3-8B dims, random weights) end to end: torch eager, torch.compile
(default mode), and kernelloop's ops serving the variants that the ops benchmark of the same run
found faster than eager for their shape bucket (as the deployer's gate would), else the fallback.
Decode is also timed as a CUDA graph replay for eager and kernelloop, as servers run it.

    python -m bench.bench_e2e --ops-json docs/results/ops-<gpu>.json --out docs/results
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench import harness
from observer.demos.llama import PRESETS, Llama, Phase, torch_ops
from observer.sdk import customops, ops
from observer.sdk.dispatch import Served
from shared import hardware
from shared.ops import get_op
from shared.schemas import RegistryEntry

PHASES = (Phase("decode b1", 1, 1, 1024), Phase("decode b32", 32, 1, 1024), Phase("prefill 2k", 1, 2048, 0))
DEPLOY_MARGIN = 1.05  # a bench speedup the gate would trust: deploy only clear wins


def install_winners(rows: list[dict], dtype: str) -> list[str]:
    """Install each row's best variant for its shape bucket where it beat eager by the margin."""
    keys = []
    for r in rows:
        if not r.get("best_params") or r.get("speedup_vs_eager", 0) < DEPLOY_MARGIN or r.get("note") == "GPT-J":
            continue
        op = get_op(r["op"])
        source, vid = harness.source_of(r["op"], r["best_params"])
        key = customops.dispatcher.key(r["op"], dtype, op.shape_bucket(r["shape"]))
        entry = RegistryEntry(variant_id=vid, source=source, params=r["best_params"], speedup=r["speedup_vs_eager"],
                              campaign_id="bench", approved_by="bench")
        customops.dispatcher.install(key, Served(vid, harness.load(r["op"], r["best_params"]), entry))
        keys.append(key)
    return keys


def _step_us(step, reps: int = 5, rounds: int = 5) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    per_round = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            step()
        end.record()
        torch.cuda.synchronize()
        per_round.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(per_round)[len(per_round) // 2]


def _graphed(step):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def run(preset: str, log) -> list[dict]:
    config = PRESETS[preset]
    eager_model = Llama(config, torch_ops(), device="cuda", seed=0)
    kl_model = Llama(config, ops, device="cuda", seed=0)  # the same seed: the same weights
    compiled = torch.compile(eager_model.forward)
    results = []
    for phase in PHASES:
        g = torch.Generator(device="cpu").manual_seed(0)
        tokens = torch.randint(0, config.vocab, (phase.batch, phase.seq), generator=g).cuda()
        for m in (eager_model, kl_model):
            m.reset_cache(phase.batch)
        kl_model.cache = eager_model.cache  # one cache: the same context for every mode
        row = {"phase": phase.name, "batch": phase.batch, "seq": phase.seq, "context": phase.start_pos}
        with torch.no_grad():
            ref = eager_model(tokens, phase.start_pos).float()
            got = kl_model(tokens, phase.start_pos).float()
            row["kernelloop_rel_err"] = float((got - ref).norm() / ref.norm())
            modes = {"eager": lambda: eager_model(tokens, phase.start_pos),
                     "compile": lambda: compiled(tokens, phase.start_pos),
                     "kernelloop": lambda: kl_model(tokens, phase.start_pos)}
            if phase.seq == 1:
                for name in ("eager", "kernelloop"):
                    try:
                        modes[f"{name}_graph"] = _graphed(modes[name])
                    except Exception as e:  # reported in the row; the other modes still run
                        row[f"{name}_graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        log(f"{phase.name}: {name} graph capture failed: {row[f'{name}_graph_error']}")
            for name, step in modes.items():
                t0 = time.monotonic()
                try:
                    row[f"{name}_us"] = _step_us(step)
                except Exception as e:
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"{phase.name}: {name} failed: {row[f'{name}_error']}")
                    continue
                row[f"{name}_tokens_per_s"] = phase.batch * phase.seq / (row[f"{name}_us"] * 1e-6)
                log(f"{phase.name:>11} {name:>16}: {row[f'{name}_us']:9.1f} us/step "
                    f"({row[f'{name}_tokens_per_s']:9.0f} tok/s; {time.monotonic() - t0:.0f} s)")
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops-json", type=Path, help="bench_ops' JSON from the same machine "
                                                       "(default: OUT/ops-<this GPU>.json, as make bench writes it)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_e2e needs a CUDA device")

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.ops_json is None:
        args.ops_json = args.out / f"ops-{hardware.slug(torch.cuda.get_device_name())}.json"
    if not args.ops_json.is_file():
        sys.exit(f"bench_e2e deploys the winners of bench_ops' run on this GPU, and {args.ops_json} is missing: "
                 "run python -m bench.bench_ops first (make bench runs both)")
    ops_result = json.loads(args.ops_json.read_text())
    keys = install_winners(ops_result["rows"], "bfloat16")
    log(f"{len(keys)} variants deployed from {args.ops_json.name}")
    rows = run(args.preset, log)
    gpu = torch.cuda.get_device_name()
    c = PRESETS[args.preset]
    payload = {"gpu": gpu, "model": f"Llama-style, {args.preset} preset: hidden {c.hidden}, {c.layers} layers, "
                                    f"random weights, bf16", "deployed_keys": keys, "rows": rows,
               "command": "python -m bench.bench_e2e " + " ".join(argv if argv is not None else sys.argv[1:])}
    stem = f"e2e-{hardware.slug(gpu)}"
    args.out.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.out / f"{stem}.json", payload)
    header = ["phase", "eager µs", "compile µs", "kernelloop µs", "kernelloop vs eager", "kernelloop vs compile",
              "eager graph µs", "kernelloop graph µs", "graph: kernelloop vs eager"]

    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    def ratio(r, a, b):
        return f(r[a] / r[b], ".2f") if r.get(a) and r.get(b) else "-"

    table = [[r["phase"], f(r.get("eager_us")), f(r.get("compile_us")), f(r.get("kernelloop_us")),
              ratio(r, "eager_us", "kernelloop_us"), ratio(r, "compile_us", "kernelloop_us"),
              f(r.get("eager_graph_us")), f(r.get("kernelloop_graph_us")),
              ratio(r, "eager_graph_us", "kernelloop_graph_us")] for r in rows]
    md = [f"# Decoder stack end to end on {gpu}\n", f"Command: `{payload['command']}`  ",
          f"{payload['model']}; {len(keys)} kernelloop variants deployed (bench wins ≥ {DEPLOY_MARGIN}x over eager); "
          "times per step, median of 5 rounds of 5 steps, device events.\n", harness.markdown_table(header, table)]
    (args.out / f"{stem}.md").write_text("\n".join(md))
    log(f"wrote {args.out}/{stem}.json and .md")


if __name__ == "__main__":
    main()
