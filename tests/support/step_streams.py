"""Simulated step-time streams of one workload process for the canary's tests: lognormal noise,
bursts of 3-10x lasting up to 8 steps, and a slow drift, with the arms in shared/canary.py's slots."""
import math

import numpy as np

from shared.canary import Step, arm_for_slot


def simulate(seed: int, factors: dict[str, float], *, windows: int = 40, steps_per_slot: int = 32,
             mix: dict[str, float] | None = None, base_us: dict[str, float] | None = None, cv: float = 0.2,
             burst_rate: float = 0.05, drift: float = 0.3, schedule_seed: int | None = None,
             window_offset: int = 0) -> list[Step]:
    """Steps of one workload process over `windows` windows. factors: candidate / incumbent step
    time per step kind (1.35 = 35% slower); mix: each kind's share of steps."""
    mix = mix or {kind: 1 / len(factors) for kind in factors}
    base_us = base_us or {kind: 10_000.0 for kind in factors}
    rng = np.random.default_rng(seed)
    n = 2 * windows * steps_per_slot
    slots = np.arange(n) // steps_per_slot
    kinds = rng.choice(list(mix), size=n, p=list(mix.values()))
    sigma = math.sqrt(math.log(1 + cv * cv))
    noise = rng.lognormal(-sigma * sigma / 2, sigma, n)
    # drift: a random walk in log space whose spread over the run is `drift`, plus a slow load cycle
    walk = np.cumsum(rng.normal(0, drift / math.sqrt(n), n)) + 0.1 * np.sin(np.arange(n) / (7 * steps_per_slot))
    burst = np.ones(n)
    for start in np.flatnonzero(rng.random(n) < burst_rate / 4.5):  # bursts last 1-8 steps, 4.5 on average
        burst[start:start + rng.integers(1, 9)] = rng.uniform(3, 10)
    arms = np.array([arm_for_slot(slot, schedule_seed) for slot in range(2 * windows)])[slots]
    factor = np.where(arms == "candidate", np.vectorize(factors.get)(kinds), 1.0)
    time_us = np.vectorize(base_us.get)(kinds) * factor * noise * np.exp(walk) * burst
    window = slots // 2 + window_offset
    return [Step(*row) for row in zip(window.tolist(), arms.tolist(), kinds.tolist(), time_us.tolist())]
