"""The canary's shared vocabulary: which arm serves a slot, one step as a workload records it, and
the per-window summary (WindowPair) a workload sends and the deployer decides on. Plain code, used
by the workload's SDK (observer/sdk/canary.py) and the deployer's statistics (deployer/canary.py),
which import nothing of each other.

Slots 2w and 2w+1 are window w, in which each arm serves once; per window and step kind each arm
gives one number, its median step time, so a burst inside a slot moves it little.
"""
import itertools
import math
import random
import statistics
from dataclasses import dataclass
from typing import Iterable, Literal, NamedTuple

Arm = Literal["candidate", "incumbent"]
ARMS: tuple[Arm, Arm] = ("candidate", "incumbent")


def arm_for_slot(slot: int, seed: int | None = None) -> Arm:
    """The arm that serves slot `slot`; slots 2w and 2w+1 form window w and serve one arm each.
    Without a seed the order is ABBA ABBA..., so a linear drift costs both arms alike over two
    windows; with one it is a seeded random order, so nothing periodic can line up with an arm."""
    if slot < 0:
        raise ValueError(f"slot must be >= 0, got {slot}")
    window, second = divmod(slot, 2)
    candidate_first = window % 2 == 0 if seed is None else random.Random(f"{seed}:{window}").random() < 0.5
    return ARMS[second] if candidate_first else ARMS[1 - second]


def _check_time(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive time, got {value!r}")


class Step(NamedTuple):
    """One model step as the workload records it."""
    window: int
    arm: str
    step_kind: str
    time_us: float


@dataclass(frozen=True)
class WindowPair:
    """What a workload sends per step kind and window: each arm's median step time and step count.
    (step_kind, source, window) is its key, so a redelivered copy merges away."""
    step_kind: str
    source: str  # the workload process: windows of different processes are different pairs
    window: int
    candidate_us: float
    incumbent_us: float
    candidate_steps: int
    incumbent_steps: int

    def __post_init__(self) -> None:
        if not self.step_kind:
            raise ValueError("step_kind must not be empty")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        _check_time("candidate_us", self.candidate_us)
        _check_time("incumbent_us", self.incumbent_us)
        if self.candidate_steps < 1 or self.incumbent_steps < 1:
            raise ValueError(f"each arm needs >= 1 step in a pair, got candidate_steps={self.candidate_steps}, "
                             f"incumbent_steps={self.incumbent_steps}")

    @property
    def key(self) -> tuple[str, str, int]:
        return self.step_kind, self.source, self.window

    @property
    def log_ratio(self) -> float:
        return math.log(self.candidate_us / self.incumbent_us)


def summarise(steps: Iterable[Step], source: str) -> tuple[WindowPair, ...]:
    """One WindowPair per (step kind, window) in which both arms ran. A window still missing an arm
    is left out: the workload sends it once complete, and a pair, once sent, never changes."""
    times: dict[tuple[str, int], dict[str, list[float]]] = {}
    for step in steps:
        if step.arm not in ARMS:
            raise ValueError(f"unknown arm {step.arm!r}, expected one of {ARMS}")
        _check_time(f"time_us of a {step.step_kind!r} step in window {step.window}", step.time_us)
        times.setdefault((step.step_kind, step.window), {arm: [] for arm in ARMS})[step.arm].append(step.time_us)
    pairs = []
    for (kind, window), arms in sorted(times.items()):
        cand, inc = arms["candidate"], arms["incumbent"]
        if cand and inc:
            pairs.append(WindowPair(kind, source, window, statistics.median(cand), statistics.median(inc),
                                    len(cand), len(inc)))
    return tuple(pairs)


def merge(*summaries: Iterable[WindowPair]) -> tuple[WindowPair, ...]:
    """Every process's and every flush's pairs as one summary, sorted by key. The same pair twice
    (redelivery) counts once; two different pairs under one key are a bug upstream and raise."""
    merged: dict[tuple[str, str, int], WindowPair] = {}
    for pair in itertools.chain(*summaries):
        if merged.setdefault(pair.key, pair) != pair:
            raise ValueError(f"conflicting summaries for step kind {pair.step_kind!r}, source {pair.source!r}, "
                             f"window {pair.window}")
    return tuple(merged[key] for key in sorted(merged))
