"""The detector measured like a classifier over the stream simulator (fixed seeds): detection delay
for 2x steps, new buckets, regressions after a deploy and idle kernels turning hot; false alarms on
stationary, bursty and rarely bursty traffic; throughput. The last line printed is one JSON object.

    python bench/bench_detector.py [--seeds 20] [--slots 10000] [--out bench/detector.json]

Delays are in windows (slots of the op), the first changed window counting 1; the JSON's delay keys
are medians over the seeds, with the worst case beside them (`*_max`, `delay_windows_2x_p90`).
"""
import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.change import ChangeDetector  # noqa: E402
from detector.simulator import MIX, NEW, detect, scenario, windows  # noqa: E402

TARGET = MIX[1].bucket  # the bucket the step scenarios change


def delays(name: str, bucket: str, reasons: set, seeds: int, noise: float, at: int = 100, horizon: int = 50,
           sources: int = 1) -> list[int]:
    """Windows from the change to the detection, counting the first changed window as 1; a miss
    (nothing within `horizon` windows) counts as 99 so it cannot hide in a median."""
    out = []
    for seed in range(seeds):
        s = scenario(name, slots=at + horizon, noise=noise, seed=seed, at=at, sources=sources)
        hits = [d.slot - at + 1 for d in detect(s, ChangeDetector(slot_s=s.slot_s))
                if d.slot >= at and d.event.key.bucket == bucket and d.event.reason in reasons]
        out.append(hits[0] if hits else 99)
    return out


def false_alarms(name: str, slots: int, noise: float, seed: int = 0) -> tuple[int, int]:
    s = scenario(name, slots=slots, noise=noise, seed=seed)
    found, fed = [], 0
    detector = ChangeDetector(slot_s=s.slot_s)
    for w in windows(s):
        fed += 1
        found += detector.observe(w)
    return len(found), fed


def throughput(sources: int = 100, slots: int = 100) -> float:
    """Windows per second through observe(), 100 processes each reporting every bucket."""
    ws = list(windows(scenario("stationary", slots=slots, sources=sources, seed=1)))
    detector = ChangeDetector()
    start = time.perf_counter()
    for w in ws:
        detector.observe(w)
    return len(ws) / (time.perf_counter() - start)


def p90(values: list[int]) -> int:
    return sorted(values)[max(0, math.ceil(0.9 * len(values)) - 1)]


def summary(values: list[int]) -> str:
    within = sum(v <= 3 for v in values) / len(values)
    return (f"median {statistics.median(values):g}, p90 {p90(values)}, max {max(values)}, "
            f"<= 3 in {within:.0%}, misses {sum(v == 99 for v in values)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeded runs per delay scenario")
    parser.add_argument("--slots", type=int, default=10000, help="slots of stationary and bursty traffic")
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)

    rate = delays("step-rate", TARGET, {"frequency_shift"}, args.seeds, args.noise)
    per_call = delays("step-time", TARGET, {"regression"}, args.seeds, args.noise)
    new = delays("new-bucket", NEW.bucket, {"new_shape"}, args.seeds, args.noise)
    regression = delays("regression", TARGET, {"regression"}, args.seeds, args.noise)
    hot = delays("idle-to-hot", MIX[2].bucket, {"idle_to_hot"}, args.seeds, args.noise)
    ramp = delays("ramp", TARGET, {"frequency_shift"}, args.seeds, args.noise, horizon=100)
    fleet = delays("step-rate", TARGET, {"frequency_shift"}, args.seeds, args.noise, sources=4)
    fa_stationary, stationary_windows = false_alarms("stationary", args.slots, args.noise)
    fa_bursty, bursty_windows = false_alarms("bursty", args.slots, args.noise)
    fa_rare, rare_windows = false_alarms("bursty-rare", args.slots, args.noise)
    speed = throughput()

    rows = [
        ("2x step in calls (delay, windows)", summary(rate)),
        ("2x step in time per call (delay, windows)", summary(per_call)),
        ("2x step in calls, 4 sources each at that noise", summary(fleet)),
        ("new bucket, 5.3 % of the op's time (delay)", summary(new)),
        ("2x slower variant deployed (delay to regression)", summary(regression)),
        ("idle bucket back at 23 % (delay)", summary(hot)),
        ("3x ramp over 40 windows (delay from its start)", summary(ramp)),
        (f"false alarms, stationary ({stationary_windows} windows)", str(fa_stationary)),
        (f"false alarms, 3x one-window bursts ({bursty_windows} windows)", str(fa_bursty)),
        (f"false alarms, rare 3x bursts, 1 in 61 windows ({rare_windows} windows)", str(fa_rare)),
        ("throughput (windows/s, 100 sources x 4 buckets)", f"{speed:,.0f}"),
    ]
    print(f"detector over the simulator: noise {args.noise:.0%} (log-normal, per window), one source, "
          f"{args.seeds} seeds per delay scenario; python {platform.python_version()} on {platform.machine()}")
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    figures = {
        "delay_windows_2x": statistics.median(rate + per_call),
        "delay_windows_2x_p90": p90(rate + per_call),
        "delay_windows_2x_max": max(rate + per_call),
        "new_bucket_delay_windows": statistics.median(new),
        "new_bucket_delay_windows_max": max(new),
        "false_alarms_stationary": fa_stationary,
        "false_alarms_bursty": fa_bursty,
        "false_alarms_bursty_rare": fa_rare,
        "delay_2x_within_3_share": round(sum(v <= 3 for v in rate + per_call) / len(rate + per_call), 3),
        "stationary_windows": stationary_windows,
        "windows_per_s": round(speed),
        "regression_delay_windows": statistics.median(regression),
        "idle_to_hot_delay_windows": statistics.median(hot),
        "noise": args.noise,
        "seeds": args.seeds,
    }
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
