"""The bound make bench-detector prints beside its delays: the share of 2x steps any detector at the
three-window test's false-alarm rate can confirm by their third window, computed by integration and
checked here against a direct simulation of that test."""
import math
import random

import pytest

from bench.bench_detector import bounds, trimmed_pass


def simulated_pass(h: float, shift: float, n: int = 40000, seed: int = 0) -> float:
    rng = random.Random(seed)
    hits = 0
    for _ in range(n):
        low = sorted(rng.gauss(shift, 1.0) for _ in range(3))[:2]
        hits += sum(low) >= h
    return hits / n


@pytest.mark.parametrize("h, shift", [(4.7, math.log(2) / 0.2), (1.0, 0.0), (2.5, 0.0), (4.7, 2.0)])
def test_the_integrated_three_window_pass_rate_matches_a_simulation(h, shift):
    want = simulated_pass(h, shift)
    assert trimmed_pass(h, shift) == pytest.approx(want, abs=4 * math.sqrt(want * (1 - want) / 40000) + 1e-4)


def test_an_unguarded_test_at_the_same_false_alarm_rate_does_better_and_99_percent_costs_false_alarms():
    b = bounds(noise=0.2, trim_h=4.7)
    assert 0.85 < b["trimmed"] < b["unguarded"] < 0.95
    assert b["fa_per_window"] < 1e-5 < b["fa_for_99"]
    quieter = bounds(noise=0.1, trim_h=4.7)  # a 2x step is 6.9 sigma a window there
    assert quieter["trimmed"] > 0.999
