"""Cost of the sampling observer: steps per second of the Llama-style stack (observer/demos/llama.py,
torch's own ops: a model that calls no kernelloop op) run plainly and through observe(step) at the
default rate (KERNELLOOP_PROFILE_EVERY, KERNELLOOP_PROFILE_ACTIVE), publishing to a local
nats-server. Rounds alternate plain and observed so drift on a shared host hits both alike.

    python -m bench.bench_observe_overhead                       # the CPU: tiny preset, decode
    python -m bench.bench_observe_overhead --preset 8b --batch 32 --out docs/results   # a GPU
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerAction

from bench import harness
from observer.demos.llama import PRESETS, Llama, torch_ops
from observer.sdk import observe
from observer.sdk.sampling import profiler_schedule
from shared import hardware, nats_server
from shared.settings import Settings


def _declare_stream(url: str) -> None:
    """What the services do at start; without the stream the windows would only be buffered."""
    import nats

    from shared.broker import STREAM_CONFIG

    async def declare():
        nc = await nats.connect(url)
        await nc.jetstream().add_stream(**STREAM_CONFIG)
        await nc.close()

    asyncio.run(declare())


def _round_s(step, steps: int, sync) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of `steps` steps. The CPU time counts the sampler's
    worker and the runtime's thread too, and barely moves with other processes' load, so it is the
    figure to trust on a shared host; on a GPU the wall clock is."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu


def _range_cost_ms(step_ms: list[tuple[int, float]], every: int, active: int, plain_ms: float) -> float:
    """Median over profiled ranges of the time their warm-up and recorded steps took beyond as many
    plain steps: a figure that noise from other processes, landing on a few steps, barely moves."""
    action = profiler_schedule(every, active)
    ranges: dict[int, float] = {}
    for index, ms in step_ms:
        if action(index) is not ProfilerAction.NONE:
            ranges[index // every] = ranges.get(index // every, 0.0) + ms - plain_ms
    return statistics.median(ranges.values()) if ranges else float("nan")


def measure(preset: str, batch: int, seq: int, rounds: int, steps: int, device: str, nats_url: str,
            every: int, active: int) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Llama(PRESETS[preset], torch_ops(), device=device, dtype=dtype)
    config = model.config
    tokens = torch.randint(0, config.vocab, (batch, seq), device=device)
    start_pos = 0 if seq > 1 else config.max_context // 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    @torch.no_grad()
    def step():
        return model(tokens, start_pos)

    sampled = observe(step, nats_url=nats_url, window_s=1.0, state_dir=tempfile.mkdtemp(), every=every,
                      active=active)
    try:
        # warm both paths: allocator, the profiler's one-time start-up (seconds, once per process)
        _round_s(step, 20, sync)
        _round_s(sampled, 2 * every, sync)
        plain, observed = [], []

        # Step by step: on a GPU the wall clock with a sync, as a server's step would end; on the CPU
        # this thread's CPU time (torch on one thread), which other processes' load barely moves.
        clock = time.perf_counter if device == "cuda" else time.thread_time

        def one(fn) -> float:
            start = clock()
            fn()
            sync()
            return (clock() - start) * 1e3

        def timed():
            index = sampled.steps
            step_ms.append((index, one(sampled)))

        for _ in range(rounds):
            plain.append(_round_s(step, steps, sync))
            observed.append(_round_s(sampled, steps, sync))
        plain_steps, step_ms = [], []
        for _ in range(2 * rounds):  # interleaved by cycle, as the rounds are
            plain_steps += [one(step) for _ in range(every)]
            for _ in range(every):
                timed()
        plain_step_ms = statistics.median(plain_steps)
        profiled_ranges = sampled.steps // every
    finally:
        sampled.close()
    convert_ms = sampled.convert_s / max(1, sampled.ranges) * 1e3
    range_ms = _range_cost_ms(step_ms, every, active, plain_step_ms)
    plain_s, observed_s = (statistics.median(r[0] for r in plain), statistics.median(r[0] for r in observed))
    plain_cpu, observed_cpu = (statistics.median(r[1] for r in plain), statistics.median(r[1] for r in observed))
    ranges_per_round = steps / every
    return {
        "preset": preset, "batch": batch, "seq": seq, "dtype": str(dtype).removeprefix("torch."),
        "every": every, "active": active, "rounds": rounds, "steps_per_round": steps,
        "plain steps/s": steps / plain_s, "observed steps/s": steps / observed_s,
        "plain ms/step": plain_s / steps * 1e3,
        "overhead %": (observed_s / plain_s - 1) * 100,
        "plain CPU ms/step": plain_cpu / steps * 1e3,
        "CPU-time overhead %": (observed_cpu / plain_cpu - 1) * 100,
        # what one profiled range costs: the overhead spread over the ranges of a round
        "ms per profiled range": (observed_s - plain_s) / ranges_per_round * 1e3,
        "CPU ms per profiled range": (observed_cpu - plain_cpu) / ranges_per_round * 1e3,
        # per range, step by step: what the serving thread waits for, and the worker's conversion
        # (on another core; it competes only for the GIL and a busy host's cores)
        "step clock": "wall, synchronized" if device == "cuda" else "thread CPU time, torch on 1 thread",
        "plain ms/step (one at a time)": plain_step_ms,
        "ms per range on the serving thread": range_ms,
        "ms per range converting": convert_ms,
        "expected overhead % (serving thread)": range_ms / (every * plain_step_ms) * 100,
        "profiled ranges": profiled_ranges, "kernel.stats published": sampled.published,
        "observed rounds (wall s, CPU s)": observed, "plain rounds (wall s, CPU s)": plain,
    }


def main() -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="observer/demos/llama.py preset (tiny on the CPU, 8b on a GPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1, help="1: decode steps; more: prefills")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default: 5 profiled ranges)")
    parser.add_argument("--every", type=int, default=settings.profile_every)
    parser.add_argument("--active", type=int, default=settings.profile_active)
    parser.add_argument("--nats-url", help="publish here instead of a local nats-server started for the run")
    parser.add_argument("--out", type=Path, help="write observe-overhead-<device>.json here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # all of a step's work on the thread whose CPU time is read
    preset = args.preset or ("8b" if device == "cuda" else "tiny")
    steps = args.steps or 5 * args.every
    server = None
    if args.nats_url is None:
        server = nats_server.start(Path(tempfile.mkdtemp()) / "nats")
        _declare_stream(server.url)
    try:
        result = measure(preset, args.batch, args.seq, args.rounds, steps, device,
                         args.nats_url or server.url, args.every, args.active)
    finally:
        if server is not None:
            server.stop()
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()}-core CPU"
    result = {"device": machine, "fingerprint": hardware.fingerprint().key, "torch": torch.__version__,
              "command": "python -m bench.bench_observe_overhead " + " ".join(sys.argv[1:]), **result}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"observe-overhead-{hardware.slug(machine)}-{preset}-b{args.batch}-s{args.seq}-every{args.every}.json"
        harness.write_json(args.out / name, result)


if __name__ == "__main__":
    main()
