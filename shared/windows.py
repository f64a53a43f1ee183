"""Windowed aggregation of kernel calls: per (op, dtype, bucket), the calls, their shapes and the
sampled times of one window, turned into KernelStats when the window closes. Pure and thread-safe:
calls arrive from the workload's threads, flushes from the runtime's background thread."""
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from shared.schemas import KernelKey, KernelStats, ShapeCount


@dataclass
class _Tally:
    variant_id: str | None
    calls: int = 0
    shapes: Counter = field(default_factory=Counter)  # tuple(shape) -> calls
    times_us: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class WindowAggregator:
    """Collects calls between two flushes; `flush(now)` closes the window and opens the next.

    Times are wall-clock epoch seconds (time.time()), so window_start is a real date."""

    def __init__(self, hardware: str, source: str, start: float):
        self.hardware = hardware
        self.source = source
        # Called with (op, dtype, bucket, variant_id, time_us) for every timed call, outside the
        # lock: the workload's canaries (observer/sdk/canary.py) take the key's time per call here.
        self.on_sample: Callable[[str, str, str, str | None, float], None] | None = None
        self._lock = threading.Lock()
        self._start = start
        self._tallies: dict[tuple[str, str, str], _Tally] = {}
        self._collectors: list[Callable[["WindowAggregator"], None]] = []

    def collect_with(self, collector: Callable[["WindowAggregator"], None]) -> None:
        """Run collector(self) at each flush, before the window closes: for calls counted elsewhere
        (the SDK's dispatch counts per call signature, lock-free) and handed over with add_calls."""
        if collector not in self._collectors:
            self._collectors.append(collector)

    def record(self, op: str, dtype: str, bucket: str, shape: list[int] | tuple[int, ...],
               variant_id: str | None, time_us: float | None = None) -> None:
        """One call served by variant_id (None: the fallback); time_us only for a sampled call."""
        with self._lock:
            tally = self._tally(op, dtype, bucket, variant_id)
            tally.calls += 1
            tally.shapes[tuple(shape)] += 1
            if time_us is not None:
                tally.times_us.append(time_us)
        if time_us is not None and (on_sample := self.on_sample) is not None:
            on_sample(op, dtype, bucket, variant_id, time_us)

    def add_calls(self, op: str, dtype: str, bucket: str, shape: list[int] | tuple[int, ...],
                  variant_id: str | None, calls: int) -> None:
        """Calls of one shape counted apart, none of them timed; variant_id is what served the last
        of them, so a hot swap inside the window is handled as record() handles it."""
        with self._lock:
            tally = self._tally(op, dtype, bucket, variant_id)
            tally.calls += calls
            tally.shapes[tuple(shape)] += calls

    def add_sample(self, op: str, dtype: str, bucket: str, variant_id: str | None, time_us: float) -> None:
        """A time measured after its call was recorded (device events are read off the critical
        path). Dropped when the key has no calls in this window, or another variant serves it by
        now: the time would blur the new variant's (a canary still takes it: it knows the variant)."""
        if (on_sample := self.on_sample) is not None:
            on_sample(op, dtype, bucket, variant_id, time_us)
        with self._lock:
            tally = self._tallies.get((op, dtype, bucket))
            if tally is not None and tally.variant_id == variant_id:
                tally.times_us.append(time_us)

    def flush(self, now: float) -> list[KernelStats]:
        for collect in list(self._collectors):
            collect(self)
        with self._lock:
            tallies, start = self._tallies, self._start
            self._tallies, self._start = {}, now
        window_s = max(now - start, 1e-6)
        window_start = datetime.fromtimestamp(start, tz=timezone.utc)
        return [self._stats(op, dtype, bucket, t, window_start, window_s)
                for (op, dtype, bucket), t in tallies.items()]

    def _tally(self, op: str, dtype: str, bucket: str, variant_id: str | None) -> _Tally:
        tally = self._tallies.get((op, dtype, bucket))
        if tally is None:
            tally = self._tallies[(op, dtype, bucket)] = _Tally(variant_id)
        elif tally.variant_id != variant_id:
            # A hot swap inside the window: the stats name one variant, so its times must be its
            # own. Calls and shapes still count; the earlier variant's samples are dropped.
            tally.variant_id = variant_id
            tally.times_us = []
        return tally

    def _stats(self, op: str, dtype: str, bucket: str, tally: _Tally,
               window_start: datetime, window_s: float) -> KernelStats:
        key = KernelKey(hardware=self.hardware, op=op, dtype=dtype, bucket=bucket)
        shapes = [ShapeCount(shape=list(s), calls=n) for s, n in tally.shapes.most_common()]
        return KernelStats(
            key=key,
            source=self.source,
            window_start=window_start,
            window_s=window_s,
            calls=tally.calls,
            shapes=shapes,
            sampled_calls=len(tally.times_us),
            sampled_time_us=sum(tally.times_us),
            time_us_p50=percentile(tally.times_us, 0.5),
            time_us_p90=percentile(tally.times_us, 0.9),
            variant_id=tally.variant_id,
        )
