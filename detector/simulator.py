"""A stream simulator: realistic noisy kernel.stats windows for one op, with stationary traffic,
step shifts, slow ramps, bursts (frequent or rare), new shapes, idle spells and deploys that
regress, from a seed.

Noise: every window's call count and time per call are the true value times a log-normal factor
whose log has standard deviation `noise` (noise=0.2: about 20 % coefficient of variation,
unbounded tails), drawn independently per window, source and figure. The detector judges slots
summed over sources, so with one source (the default) the judged figures carry the full noise.

`cli(argv)` prints the windows of a scenario as JSON lines, or (--detect) runs the detector over
them and prints each detection with the slot that raised it.
"""
import argparse
import json
import math
import random
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Iterator, Literal

from shared.schemas import KernelKey, KernelStats, ShapeCount

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
# How many of a window's calls carry a time; it weights windows only: a window's time per call has
# the scenario's `noise` whatever the SDK's sampling rate (observer/sdk/dispatch.py).
SAMPLE_EVERY = 8

ChangeKind = Literal["step", "ramp", "burst", "appear", "idle", "deploy"]


@dataclass(frozen=True)
class Bucket:
    bucket: str
    shape: tuple[int, ...]
    calls: float  # mean calls per window and source
    time_us: float  # mean time per call
    variant_id: str | None = None


@dataclass(frozen=True)
class Change:
    """kind: step (from `at` on), ramp (linear in the log from `at` to `until`), burst (only in
    [at, until)), appear (the bucket has no calls before `at`), idle (no calls in [at, until)),
    deploy (from `at` a new variant serves, with time per call times `time`)."""

    kind: ChangeKind
    bucket: str
    at: int
    until: int | None = None
    rate: float = 1.0  # factor on calls
    time: float = 1.0  # factor on time per call
    variant_id: str | None = None  # deploy: what serves from `at`

    def factors(self, slot: int) -> tuple[float, float]:
        if slot < self.at:
            return 1.0, 1.0
        if self.kind == "ramp":
            done = min(1.0, (slot - self.at) / max(1, (self.until or self.at + 1) - self.at))
            return self.rate ** done, self.time ** done
        if self.kind in ("burst", "idle") and self.until is not None and slot >= self.until:
            return 1.0, 1.0
        if self.kind == "idle":
            return 0.0, 1.0
        return self.rate, self.time


@dataclass(frozen=True)
class Scenario:
    name: str
    buckets: tuple[Bucket, ...]
    changes: tuple[Change, ...] = ()
    slots: int = 200
    sources: int = 1
    noise: float = 0.2
    seed: int = 0
    slot_s: float = 5.0
    hardware: str = "sim-gpu"
    op: str = "rmsnorm"
    dtype: str = "float16"


# A tuned fleet: decode ~47 %, small batches ~28 %, prefill ~23 %, an odd hidden size ~2.5 % of
# the op's time, each served by a deployed variant (so a fresh detector has nothing new to announce).
MIX = (
    Bucket("h4096-r16", (16, 4096), 1000, 10.0, "v-decode"),
    Bucket("h4096-r256", (256, 4096), 300, 20.0, "v-small"),
    Bucket("h4096-r4k", (4096, 4096), 50, 100.0, "v-prefill"),
    Bucket("h1000-r16", (16, 1000), 60, 9.0, "v-odd"),
)
NEW = Bucket("h8192-r64", (64, 8192), 60, 20.0)  # 5.3 % of the op's time once it appears; the fallback serves it


def scenario(name: str, slots: int = 200, noise: float = 0.2, seed: int = 0, sources: int = 1,
             at: int | None = None) -> Scenario:
    """The named scenarios the tests and the benchmark use; `at` is when the change happens."""
    at = slots // 2 if at is None else at
    base = Scenario(name, MIX, slots=slots, noise=noise, seed=seed, sources=sources)
    target = MIX[1].bucket  # a bucket with a quarter of the time
    changes = {
        "stationary": (),
        "step-rate": (Change("step", target, at, rate=2.0),),
        "step-time": (Change("step", target, at, time=2.0),),
        "ramp": (Change("ramp", target, at, at + 40, rate=3.0),),
        "bursty": tuple(Change("burst", b.bucket, s, s + 1, rate=3.0)
                        for i, b in enumerate(MIX) for s in range(7 + 3 * i, slots, 13)),
        # bursts too rare to widen the noise estimate much: each must be ignored on its own merits
        "bursty-rare": tuple(Change("burst", b.bucket, s, s + 1, rate=3.0)
                             for i, b in enumerate(MIX) for s in range(17 + 7 * i, slots, 61)),
        "new-bucket": (Change("appear", NEW.bucket, at),),
        "idle-to-hot": (Change("idle", MIX[2].bucket, at // 2, at),),
        "regression": (Change("deploy", target, at, time=2.0, variant_id="v-slow"),),
        "deploy-faster": (Change("deploy", target, at, time=0.6, variant_id="v-fast"),),
        # a deploy that serves 1.35x slower: under the CUSUM's min_ratio, caught by the deploy's own test
        "mild-regression": (Change("deploy", target, at, time=1.35, variant_id="v-mild"),),
        "deploy-same": (Change("deploy", target, at, time=1.0, variant_id="v-same"),),
    }
    if name not in changes:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(changes)}")
    buckets = MIX + (NEW,) if name == "new-bucket" else MIX
    return replace(base, buckets=buckets, changes=changes[name])


def _noisy(rng: random.Random, mean: float, noise: float) -> float:
    # mean-preserving log-normal factor
    return mean * math.exp(rng.gauss(-noise * noise / 2, noise)) if noise > 0 else mean


def windows(s: Scenario) -> Iterator[KernelStats]:
    """Every source's window of every bucket, slot by slot."""
    rng = random.Random(s.seed)
    appears = {c.bucket: c.at for c in s.changes if c.kind == "appear"}
    by_bucket: dict[str, list[Change]] = {}
    for c in s.changes:
        by_bucket.setdefault(c.bucket, []).append(c)
    for slot in range(s.slots):
        start = T0 + timedelta(seconds=slot * s.slot_s)
        for b in s.buckets:
            if slot < appears.get(b.bucket, 0):
                continue
            rate, time, variant_id = 1.0, 1.0, b.variant_id
            for c in by_bucket.get(b.bucket, ()):
                if c.at <= slot and (c.kind not in ("burst", "idle") or c.until is None or slot < c.until):
                    r, t = c.factors(slot)
                    rate, time = rate * r, time * t
                    if c.kind == "deploy" and slot >= c.at:
                        variant_id = c.variant_id
            for source in range(s.sources):
                calls = round(_noisy(rng, b.calls * rate, s.noise))
                per_call = _noisy(rng, b.time_us * time, s.noise)
                if calls <= 0:
                    continue
                sampled = max(1, calls // SAMPLE_EVERY)
                yield KernelStats.model_construct(
                    key=KernelKey(hardware=s.hardware, op=s.op, dtype=s.dtype, bucket=b.bucket),
                    source=f"sim-host:{source}", window_start=start, window_s=s.slot_s, calls=calls,
                    shapes=[ShapeCount(shape=list(b.shape), calls=calls)], sampled_calls=sampled,
                    sampled_time_us=sampled * per_call, time_us_p50=None, time_us_p90=None,
                    variant_id=variant_id, event_id=f"sim-{s.seed}-{slot}-{b.bucket}-{source}",
                    schema_version=1, time=start)


@dataclass
class Detection:
    slot: int  # the slot whose judgement raised it (the slot before the window that arrived)
    event: object = field(repr=False)


def detect(s: Scenario, detector) -> list[Detection]:
    """Run a detector over a scenario; a slot is judged when the next slot's first window comes, so
    each detection is attributed to the slot before the window that raised it."""
    found = []
    for w in windows(s):
        slot = round((w.window_start - T0).total_seconds() / s.slot_s)
        for event in detector.observe(w):
            found.append(Detection(slot - 1, event))
    return found


def cli(argv: list[str] | None = None) -> int:
    from detector.change import ChangeDetector

    parser = argparse.ArgumentParser(prog="kernelloop simulate",
                                     description="simulated kernel.stats windows, or the detector's answers to them")
    parser.add_argument("scenario", nargs="?", default="stationary",
                        help="stationary, step-rate, step-time, ramp, bursty, bursty-rare, new-bucket, "
                             "idle-to-hot, regression, deploy-faster, mild-regression, deploy-same")
    parser.add_argument("--slots", type=int, default=200, help="windows per source and bucket")
    parser.add_argument("--noise", type=float, default=0.2, help="log-normal noise per window (0.2: ~20%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sources", type=int, default=1, help="processes reporting")
    parser.add_argument("--at", type=int, default=None, help="slot of the change (default: the middle)")
    parser.add_argument("--detect", action="store_true", help="run the detector and print its detections")
    args = parser.parse_args(argv)
    if args.slots < 1 or args.sources < 1 or args.noise < 0:
        parser.error("--slots and --sources must be at least 1 and --noise at least 0")
    try:
        s = scenario(args.scenario, args.slots, args.noise, args.seed, args.sources, args.at)
    except ValueError as e:
        parser.error(str(e))
    out = sys.stdout
    if not args.detect:
        for w in windows(s):
            out.write(KernelStats.model_validate(w.model_dump()).model_dump_json() + "\n")
        return 0
    for d in detect(s, ChangeDetector(slot_s=s.slot_s)):
        e = d.event
        out.write(json.dumps({"slot": d.slot, "key": str(e.key), "reason": e.reason, "after_deploy": e.after_deploy,
                              "detail": e.detail}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
