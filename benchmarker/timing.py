"""Incumbent and candidate timed in one run, interleaved A B A B after a warm-up, on the same inputs;
on CUDA by device events with L2 flushed (256 MB read) and a short device-side wait before
every call (so the host's launch path is not timed), elsewhere by wall clock around each call.
Per shape: median and IQR of the reps. Weighted speedup =
sum w*median(incumbent) / sum w*median(candidate) with the profile's weights normalised (the
expected time saved on the production mix); 95% CI by bootstrap, reps resampled within each shape.
With a guard (a benchmark's is benchmarker/check.py's TimedCheck), every call, warm-up included,
gets input values no call saw before and has its output checked against the reference, both outside
the timed window, so no result can be carried between reps."""
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

# Larger than any current GPU's L2, so every rep starts cold. The flush reads: a written flush would
# leave L2 full of dirty lines whose write-back the timed call pays (on an H100, 32 MB calls took
# 19-30 % longer: docs/results/flush-*.json), a cost no serving step has after kernels that mostly
# read weights.
FLUSH_BYTES = 256 * 2**20
# A device-side wait after the flush (~0.5 ms at H100 clocks): the host queues the call before the
# device reaches the start event, so the events bracket device time, not the host's launch path
# (which the dispatch measures apart). Without it a slow host makes small kernels time the host.
SLACK_CYCLES = 1_000_000


class Guard(Protocol):
    """What runs around each call outside its timed window (benchmarker/check.py's TimedCheck):
    before(i) and after(i, output) for fns[i]; call(i, fn, args) makes the timed call itself."""

    def before(self, i: int) -> None: ...

    def call(self, i: int, fn: Callable, args: tuple) -> Any: ...

    def after(self, i: int, out: Any) -> None: ...


class Unguarded:
    def before(self, i: int) -> None:
        pass

    def call(self, i: int, fn: Callable, args: tuple) -> Any:
        return fn(*args)

    def after(self, i: int, out: Any) -> None:
        pass


def time_pair(incumbent: Callable, candidate: Callable, args: tuple, reps: int, warmup: int,
              device: str, guard: Guard | None = None) -> tuple[list[float], list[float]]:
    """Per-rep times in us of incumbent(*args) and candidate(*args), interleaved in one run."""
    inc, cand = time_interleaved([incumbent, candidate], args, reps, warmup, device, guard)
    return inc, cand


def time_interleaved(fns: Sequence[Callable], args: tuple, reps: int, warmup: int,
                     device: str, guard: Guard | None = None) -> list[list[float]]:
    """Per-rep times in us of each fn(*args), the fns taking turns within every rep (A B C A B C),
    so a drift of clocks or temperature hits all of them alike."""
    guard = guard or Unguarded()
    for _ in range(warmup):
        for i, fn in enumerate(fns):
            guard.before(i)
            guard.after(i, guard.call(i, fn, args))
    if device == "cuda":
        return _time_cuda(fns, args, reps, guard)
    return _time_wall(fns, args, reps, guard)


def _time_cuda(fns: Sequence[Callable], args: tuple, reps: int, guard: Guard) -> list[list[float]]:
    flush = torch.zeros(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    sleep = getattr(torch.cuda, "_sleep", None)
    events: list[list] = [[] for _ in fns]
    for _ in range(reps):
        for i, (fn, out) in enumerate(zip(fns, events)):
            guard.before(i)
            flush.sum()  # outside the events, after the guard's writes: every rep starts cold
            if sleep is not None:
                sleep(SLACK_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = guard.call(i, fn, args)
            end.record()
            guard.after(i, result)
            out.append((start, end))
    torch.cuda.synchronize()  # one sync at the end: no host round trip between reps
    return [[s.elapsed_time(e) * 1e3 for s, e in pairs] for pairs in events]  # ms -> us


def _time_wall(fns: Sequence[Callable], args: tuple, reps: int, guard: Guard) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, (fn, out) in enumerate(zip(fns, times)):
            guard.before(i)
            start = time.perf_counter()
            result = guard.call(i, fn, args)
            out.append((time.perf_counter() - start) * 1e6)
            guard.after(i, result)
    return times


# ---- statistics (pure) --------------------------------------------------------------------------


def median(times: Sequence[float]) -> float:
    return float(np.median(np.asarray(times, dtype=np.float64)))


def iqr(times: Sequence[float]) -> float:
    q1, q3 = np.percentile(np.asarray(times, dtype=np.float64), [25, 75])
    return float(q3 - q1)


def weighted_speedup(incumbent_times_by_shape: Sequence[Sequence[float]],
                     candidate_times_by_shape: Sequence[Sequence[float]], weights: Sequence[float]) -> float:
    w = _normalised(weights)
    inc = sum(wi * median(t) for wi, t in zip(w, incumbent_times_by_shape))
    cand = sum(wi * median(t) for wi, t in zip(w, candidate_times_by_shape))
    return inc / cand


def speedup_ci(incumbent_times_by_shape: Sequence[Sequence[float]],
               candidate_times_by_shape: Sequence[Sequence[float]], weights: Sequence[float],
               n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(weighted speedup, CI low, CI high): percentile bootstrap, 95%, reps resampled per shape."""
    if not (len(incumbent_times_by_shape) == len(candidate_times_by_shape) == len(weights)):
        raise ValueError("one list of incumbent times, one of candidate times and one weight per shape")
    w = _normalised(weights)
    rng = np.random.default_rng(seed)
    inc_total = np.zeros(n_boot)
    cand_total = np.zeros(n_boot)
    for wi, inc, cand in zip(w, incumbent_times_by_shape, candidate_times_by_shape):
        inc_total += wi * _boot_medians(np.asarray(inc, dtype=np.float64), n_boot, rng)
        cand_total += wi * _boot_medians(np.asarray(cand, dtype=np.float64), n_boot, rng)
    ratios = inc_total / cand_total
    low, high = np.percentile(ratios, [2.5, 97.5])
    point = weighted_speedup(incumbent_times_by_shape, candidate_times_by_shape, weights)
    return point, float(low), float(high)


def _boot_medians(times: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    # times: [reps] -> medians: [n_boot], each over a resample with replacement of the reps
    if times.size == 0:
        raise ValueError("no timed reps for a shape")
    picks = rng.integers(0, times.size, size=(n_boot, times.size))
    return np.median(times[picks], axis=1)


def _normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("profile weights must sum to a positive number")
    return [float(x) / total for x in weights]
