"""Timing statistics and the interleaved timing loop."""
import random
import time

import pytest

from benchmarker.timing import iqr, median, speedup_ci, time_pair, weighted_speedup


def _noisy(center: float, n: int, rng: random.Random) -> list[float]:
    return [center * rng.uniform(0.9, 1.1) for _ in range(n)]


def test_identical_samples_give_a_ci_containing_one():
    rng = random.Random(1)
    shapes = [_noisy(100.0, 30, rng), _noisy(40.0, 30, rng)]
    point, low, high = speedup_ci(shapes, [list(s) for s in shapes], [1.0, 1.0], seed=3)
    assert point == pytest.approx(1.0)
    assert low <= 1.0 <= high


def test_clearly_twice_as_fast_candidate_has_ci_low_above_one_and_a_half():
    rng = random.Random(2)
    incumbent = [_noisy(100.0, 20, rng), _noisy(50.0, 20, rng)]
    candidate = [_noisy(50.0, 20, rng), _noisy(25.0, 20, rng)]
    point, low, high = speedup_ci(incumbent, candidate, [3.0, 1.0], seed=3)
    assert 1.8 < point < 2.2
    assert low > 1.5 and high < 2.5
    assert low <= point <= high


def test_weights_decide_which_shape_counts():
    # Candidate is 2x faster on shape 0 and 2x slower on shape 1; both shapes take 100 us today.
    incumbent = [[100.0] * 5, [100.0] * 5]
    candidate = [[50.0] * 5, [200.0] * 5]
    assert weighted_speedup(incumbent, candidate, [9.0, 1.0]) > 1.5
    assert weighted_speedup(incumbent, candidate, [1.0, 9.0]) < 0.6
    # Unnormalised weights mean the same as normalised ones.
    assert weighted_speedup(incumbent, candidate, [90.0, 10.0]) == pytest.approx(
        weighted_speedup(incumbent, candidate, [0.9, 0.1]))


def test_weighted_speedup_is_expected_time_saved_not_mean_of_ratios():
    # A 10x win on a 1 us shape saves little next to a 1.25x loss on a 1000 us shape of equal weight.
    incumbent = [[1.0] * 3, [1000.0] * 3]
    candidate = [[0.1] * 3, [1250.0] * 3]
    assert weighted_speedup(incumbent, candidate, [1.0, 1.0]) == pytest.approx(1001.0 / 1250.1)


def test_ci_is_reproducible_for_a_seed():
    rng = random.Random(4)
    incumbent, candidate = [_noisy(10.0, 15, rng)], [_noisy(8.0, 15, rng)]
    assert speedup_ci(incumbent, candidate, [1.0], seed=9) == speedup_ci(incumbent, candidate, [1.0], seed=9)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        speedup_ci([[1.0]], [[1.0], [2.0]], [1.0])


def test_median_and_iqr():
    assert median([5.0, 1.0, 3.0]) == 3.0
    assert iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0)
    assert iqr([7.0] * 4) == 0.0


def test_time_pair_interleaves_incumbent_and_candidate_after_warmup():
    calls = []
    incumbent = lambda x: calls.append("A")  # noqa: E731
    candidate = lambda x: calls.append("B")  # noqa: E731
    inc, cand = time_pair(incumbent, candidate, (0,), reps=4, warmup=2, device="cpu")
    assert calls == ["A", "B"] * 6
    assert len(inc) == len(cand) == 4
    assert all(t >= 0.0 for t in inc + cand)


def test_time_pair_measures_each_call_in_microseconds():
    inc, cand = time_pair(lambda: time.sleep(0.005), lambda: None, (), reps=3, warmup=0, device="cpu")
    assert median(inc) >= 4500.0  # a 5 ms sleep
    assert median(cand) < median(inc) / 5


def test_time_interleaved_takes_turns_among_any_number_of_functions():
    from benchmarker.timing import time_interleaved

    calls = []
    fns = [lambda tag=tag: calls.append(tag) for tag in "ABC"]
    times = time_interleaved(fns, (), reps=2, warmup=1, device="cpu")
    assert calls == list("ABC") * 3
    assert [len(t) for t in times] == [2, 2, 2]
