"""Load on the detector: many workload processes publish kernel.stats windows at a steady rate
while the detector consumes them over a real NATS; measures whether it keeps up.

Each simulated workload process is its own NATS connection with its own source name, publishing
one window per key in turn (10 keys: 5 ops x 2 shape buckets) with JetStream acks, so a window
the stream did not take is counted, not lost silently. They run as asyncio tasks spread over a
few OS processes: a hundred Python interpreters would measure this machine's scheduler, not the
detector. Every second the monitor reads the detector's durable consumer: lag = windows the stream
holds that the detector has not yet acked.

    python bench/bench_load.py --procs 100 --rate 10 --seconds 60     # the issue's load
    python bench/bench_load.py --procs 10 --rate 10 --seconds 10      # a quick check
    python bench/bench_load.py --backlog 30000   # the detector's own rate: a queued backlog drained

Without NATS_URL it starts an embedded nats-server and the detector service (the other services
are not needed to consume kernel.stats; the detections this traffic causes go out as usage.changed
and hypothesis events as usual). The last line printed is one JSON object.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats  # noqa: E402

from shared import subjects, supervisor  # noqa: E402
from shared.schemas import KernelKey, KernelStats, ShapeCount  # noqa: E402

# (op, shape) pairs a decoder's serving process runs; buckets come from each op's own bucketing.
KEYS = [("rmsnorm", [16, 4096]), ("rmsnorm", [256, 4096]), ("softmax", [16, 32000]), ("softmax", [128, 32000]),
        ("silu_and_mul", [16, 22016]), ("silu_and_mul", [256, 22016]), ("rotary", [16, 32, 128]),
        ("rotary", [256, 32, 128]), ("layernorm", [16, 4096]), ("layernorm", [256, 4096])]


def _keys(hardware: str) -> list[tuple[KernelKey, list[int]]]:
    from shared.ops import CATALOG

    return [(KernelKey(hardware=hardware, op=op, dtype="bfloat16", bucket=CATALOG[op].shape_bucket(shape)), shape)
            for op, shape in KEYS]


def _window(key: KernelKey, shape: list[int], source: str, rng: random.Random, seq: int) -> bytes:
    now = datetime.now(timezone.utc)
    calls = max(1, round(400 * rng.lognormvariate(-0.02, 0.2)))
    sampled = max(1, calls // 8)
    stats = KernelStats(event_id=f"{source}-{seq}", key=key, source=source, window_start=now - timedelta(seconds=1),
                        window_s=1.0, calls=calls, shapes=[ShapeCount(shape=shape, calls=calls)],
                        sampled_calls=sampled, sampled_time_us=sampled * 12.0 * rng.lognormvariate(-0.02, 0.2))
    return stats.model_dump_json().encode()


async def _workload(url: str, name: str, rate: float, seconds: float, hardware: str) -> tuple[int, int, float, float]:
    """One simulated process: `rate` windows a second for `seconds`; returns (acked, failed, first, last)
    with the wall-clock times of its first and last publish."""
    nc = await nats.connect(url, max_reconnect_attempts=-1)
    js = nc.jetstream()
    keys, rng = _keys(hardware), random.Random(name)
    acked = failed = 0
    start = time.monotonic() + rng.random() / rate  # spread the processes over the first interval
    first = time.time()
    for seq in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + seq / rate - time.monotonic()))
        key, shape = keys[seq % len(keys)]
        try:
            await js.publish(subjects.KERNEL_STATS, _window(key, shape, name, rng, seq), timeout=10.0,
                             headers={"Nats-Msg-Id": f"{name}-{seq}"})
            acked += 1
        except Exception:  # counted: a window the stream did not confirm
            failed += 1
    last = time.time()
    await nc.close()
    return acked, failed, first, last


def _publisher(url: str, names: list[str], rate: float, seconds: float, hardware: str, out) -> None:
    async def main():
        return await asyncio.gather(*(_workload(url, n, rate, seconds, hardware) for n in names))

    results = asyncio.run(main())
    out.put((sum(r[0] for r in results), sum(r[1] for r in results), min(r[2] for r in results),
             max(r[3] for r in results)))


async def _lag(nc) -> tuple[int, int]:
    """(windows not yet acked by the detector, windows it acked)"""
    info = await nc.jetstream().consumer_info(subjects.STREAM_NAME, subjects.DURABLE[subjects.KERNEL_STATS])
    return info.num_pending + info.num_ack_pending, info.ack_floor.stream_seq


async def _wait_for_detector(url: str, loop, timeout: float = 90.0) -> None:
    nc = await nats.connect(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await _lag(nc)
                return
            except Exception:  # the stream or the consumer does not exist yet
                if loop.dead() or time.monotonic() > deadline:
                    raise RuntimeError(f"the detector did not start; see {loop.state_dir / 'logs'}") from None
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def _monitor(url: str, publishers: list, seconds: float, drain_s: float) -> dict:
    nc = await nats.connect(url)
    try:
        samples, t0 = [], time.monotonic()
        while any(p.is_alive() for p in publishers):
            lag, _ = await _lag(nc)
            samples.append((time.monotonic() - t0, lag))
            await asyncio.sleep(1.0)
        stopped = time.monotonic()
        while (lag := (await _lag(nc))[0]) and time.monotonic() - stopped < drain_s:
            await asyncio.sleep(0.5)
        drained_s = time.monotonic() - stopped
        info = await nc.jetstream().stream_info(subjects.STREAM_NAME, subjects_filter=subjects.KERNEL_STATS)
        stored = (info.state.subjects or {}).get(subjects.KERNEL_STATS, 0)
        dead = await nc.jetstream().stream_info(subjects.STREAM_NAME, subjects_filter=f"dead.{subjects.KERNEL_STATS}")
        steady = [lag for t, lag in samples if t >= min(5.0, seconds / 2)] or [0]
        return {"lag_windows_max": max(lag for _, lag in samples) if samples else 0,
                "lag_windows_median": statistics.median(steady), "lag_windows_end": lag,
                "drain_s": round(drained_s, 1), "stored": stored,
                "dead_lettered": (dead.state.subjects or {}).get(f"dead.{subjects.KERNEL_STATS}", 0),
                "lag_series": [[round(t, 1), n] for t, n in samples]}
    finally:
        await nc.close()


def run(procs: int, rate: float, seconds: float, os_procs: int, nats_url: str | None, hardware: str) -> dict:
    state = Path(tempfile.mkdtemp(prefix="kernelloop-load-"))
    loop = supervisor.start(state, nats_url=nats_url, services=("detector",)) if not nats_url else None
    url = nats_url or loop.urls.get("workload", loop.nats_url)
    admin = nats_url or loop.nats_url
    try:
        if loop:
            asyncio.run(_wait_for_detector(admin, loop))
        names = [f"load-{os.getpid()}-{i}" for i in range(procs)]
        out = multiprocessing.get_context("spawn").Queue()
        publishers = [multiprocessing.get_context("spawn").Process(
            target=_publisher, args=(url, names[i::os_procs], rate, seconds, hardware, out)) for i in range(os_procs)]
        for p in publishers:
            p.start()
        found = asyncio.run(_monitor(admin, publishers, seconds, drain_s=120.0))
        counts = [out.get(timeout=30) for _ in publishers]
        for p in publishers:
            p.join()
        acked, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
        elapsed = max(c[3] for c in counts) - min(c[2] for c in counts)
        return {"procs": procs, "rate_per_proc": rate, "seconds": seconds, "published": acked,
                "publish_failed": failed, "offered_windows_per_s": round(acked / max(elapsed, 1e-9)),
                "processed_all": found["lag_windows_end"] == 0 and found["stored"] >= acked, **found}
    finally:
        if loop:
            loop.stop()


async def _backlog(url: str, admin: str, windows: int, detector) -> dict:
    """The detector's own capacity: with the detector paused (SIGSTOP) after it has rebuilt its
    profile, `windows` windows are queued; then it resumes and the drain is timed."""
    nc = await nats.connect(admin)
    pub = await nats.connect(url)
    try:
        js, keys, rng = pub.jetstream(), _keys("load-sim"), random.Random(0)
        key, shape = keys[0]
        await js.publish(subjects.KERNEL_STATS, _window(key, shape, "warm-up", rng, 0))
        while (await _lag(nc))[0]:  # the first window makes it rebuild its profile
            await asyncio.sleep(0.2)
        detector.send_signal(signal.SIGSTOP)
        try:
            acks = []
            for seq in range(windows):
                key, shape = keys[seq % len(keys)]
                acks.append(await js.publish_async(subjects.KERNEL_STATS,
                                                   _window(key, shape, f"backlog-{seq % 100}", rng, seq)))
                if len(acks) >= 512:
                    await asyncio.gather(*acks)
                    acks.clear()
            await asyncio.gather(*acks)
            queued = (await _lag(nc))[0]
        finally:
            detector.send_signal(signal.SIGCONT)
        start = time.monotonic()
        while (await _lag(nc))[0] and time.monotonic() - start < 300:
            await asyncio.sleep(0.1)
        drained = time.monotonic() - start
        return {"backlog_windows": queued, "drain_s": round(drained, 2),
                "detector_windows_per_s": round(queued / drained), "lag_windows_end": (await _lag(nc))[0]}
    finally:
        await pub.close()
        await nc.close()


def capacity(windows: int) -> dict:
    state = Path(tempfile.mkdtemp(prefix="kernelloop-load-"))
    loop = supervisor.start(state, services=("detector",))
    try:
        asyncio.run(_wait_for_detector(loop.nats_url, loop))
        return asyncio.run(_backlog(loop.urls.get("workload", loop.nats_url), loop.nats_url, windows,
                                    loop.processes["detector"]))
    finally:
        loop.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=100, help="simulated workload processes")
    parser.add_argument("--rate", type=float, default=10.0, help="windows per second per process")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--os-procs", type=int, default=4, help="OS processes the workloads are spread over")
    parser.add_argument("--hardware", default="load-sim", help="hardware token of the simulated fleet")
    parser.add_argument("--backlog", type=int, metavar="N",
                        help="instead: queue N windows while the detector is paused, and time its drain")
    args = parser.parse_args(argv)
    if args.backlog:
        found = capacity(args.backlog)
        print(json.dumps(found))
        return 0 if found["lag_windows_end"] == 0 else 1
    result = run(args.procs, args.rate, args.seconds, max(1, min(args.os_procs, args.procs)),
                 os.environ.get("NATS_URL") or None, args.hardware)
    series = result.pop("lag_series")
    print("t (s)  lag (windows)")
    for t, n in series[:: max(1, len(series) // 20)]:
        print(f"{t:6.1f}  {n}")
    print(json.dumps(result))
    return 0 if result["processed_all"] and not result["publish_failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
