"""The canary's statistics on simulated step-time streams: lognormal noise at 20% CV, bursts of
3-10x lasting up to 8 steps on 5% of steps, and a slow drift, over many seeds."""
import math

import pytest

from deployer.canary import (Policy, Step, WindowPair, arm_for_slot, decide, merge, student_t_quantile,
                             summarise)
from support.step_streams import simulate

SEEDS = range(20)


def run_canary(pairs: tuple[WindowPair, ...], policy: Policy = Policy()):
    """Decide after every window, as the deployer does, and stop at the first verdict."""
    windows = sorted({(p.source, p.window) for p in pairs}, key=lambda sw: (sw[1], sw[0]))
    verdict = None
    for seen in range(1, len(windows) + 1):
        arrived = set(windows[:seen])
        verdict = decide([p for p in pairs if (p.source, p.window) in arrived], policy)
        if verdict.action != "continue":
            return verdict
    return verdict


def canary(seed: int, factors: dict[str, float], **kwargs):
    return run_canary(summarise(simulate(seed, factors, **kwargs), "p0"))


def pair(kind: str, window: int, candidate_us: float, incumbent_us: float = 1000.0, steps: int = 30,
         source: str = "p0") -> WindowPair:
    return WindowPair(kind, source, window, candidate_us, incumbent_us, steps, steps)


# --- verdicts on simulated workloads -------------------------------------------------------------

def test_canary_withdraws_a_step_135x_slower_and_never_promotes_it():
    verdicts = [canary(seed, {"decode:b16": 1.35}) for seed in SEEDS]
    assert not [v for v in verdicts if v.action == "promote"]
    withdrawn_slower = [v for v in verdicts if v.action == "withdraw" and v.slower]
    assert len(withdrawn_slower) >= 19, [v.reason for v in verdicts]
    assert all(v.speedup < 1 for v in verdicts)


def test_canary_promotes_a_step_11x_faster():
    verdicts = [canary(seed, {"decode:b16": 1 / 1.1}) for seed in SEEDS]
    assert not [v for v in verdicts if v.action == "withdraw" and v.slower]
    promoted = [v for v in verdicts if v.action == "promote"]
    assert len(promoted) >= 19, [v.reason for v in verdicts]
    assert all(v.speedup_ci[0] > 1 for v in promoted)


def test_canary_promotes_under_a_seeded_random_arm_order_too():
    verdicts = [canary(seed, {"decode:b16": 1 / 1.1}, schedule_seed=seed) for seed in SEEDS]
    assert sum(v.action == "promote" for v in verdicts) >= 19


def test_canary_promotes_an_equal_step_at_most_at_the_alpha_it_promises():
    # Bonferroni over the looks bounds false promotion by alpha = 5%; these seeds give 1 in 200.
    # Without the correction (alpha at every look) 38 of the same 200 are promoted.
    verdicts = [canary(seed, {"decode:b16": 1.0}) for seed in range(200)]
    false_promotions = [v for v in verdicts if v.action == "promote"]
    assert len(false_promotions) <= 0.05 * len(verdicts), [v.reason for v in false_promotions]
    # The rest run to max windows and are withdrawn as not faster, not as slower.
    withdrawn = [v for v in verdicts if v.action == "withdraw"]
    assert len(withdrawn) + len(false_promotions) == len(verdicts)
    assert all(not v.slower and v.windows == 40 for v in withdrawn)


def test_canary_withdraws_when_one_kind_is_slower_though_the_other_is_faster():
    # Decode gains 15% on 79% of step time; prefill loses 35% on the rest.
    verdicts = [canary(seed, {"decode:b16": 1 / 1.15, "prefill:n1024": 1.35}, mix={"decode:b16": 0.85,
                       "prefill:n1024": 0.15}, base_us={"decode:b16": 10_000.0, "prefill:n1024": 15_000.0},
                       steps_per_slot=64) for seed in SEEDS]
    assert not [v for v in verdicts if v.action == "promote"]
    assert sum(v.action == "withdraw" and v.slower and "prefill:n1024" in v.reason for v in verdicts) >= 19


def test_slower_kind_blocks_promotion_that_the_combination_alone_would_give():
    faster = [pair("decode:b16", w, 800.0 + w % 3) for w in range(10)]  # 1.25x faster, 90% of the time
    slower = [pair("prefill:n1024", w, 150.0 + w % 2, 100.0, steps=30) for w in range(10)]  # 1.5x slower
    assert decide(faster).action == "promote"
    blocked = decide(faster + slower)
    assert blocked.action == "withdraw" and blocked.slower
    assert "prefill:n1024 clearly slower" in blocked.reason
    assert blocked.speedup > 1  # the time-weighted step is faster: the block is the slower kind alone
    assert {v.step_kind: v.action for v in blocked.kinds} == {"decode:b16": "promote", "prefill:n1024": "withdraw"}


def test_canary_continues_before_min_windows_even_when_far_slower():
    pairs = [pair("decode:b16", w, 3000.0 + w) for w in range(5)]
    verdict = decide(pairs)
    assert verdict.action == "continue" and verdict.windows == 5
    assert decide([]).action == "continue"
    assert decide(pairs + [pair("decode:b16", 5, 3000.0)]).action == "withdraw"


def test_kind_with_too_few_windows_is_left_out_of_the_combination():
    pairs = [pair("decode:b16", w, 800.0 + w % 3) for w in range(10)] + [pair("prefill:n1024", 0, 5000.0)]
    verdict = decide(pairs)
    assert verdict.action == "promote"
    assert {v.step_kind: v.action for v in verdict.kinds}["prefill:n1024"] == "continue"


# --- merging --------------------------------------------------------------------------------------

def test_two_processes_merge_to_the_verdict_of_one_process_with_both_streams():
    for seed in range(5):
        a = simulate(seed, {"decode:b16": 1 / 1.1}, windows=12)
        b = simulate(seed + 100, {"decode:b16": 1 / 1.1}, windows=12)
        two = decide(merge(summarise(a, "p0"), summarise(b, "p1")))
        # one process that ran the second stream after the first
        one = decide(summarise(a + [s._replace(window=s.window + 12) for s in b], "p0"))
        assert (two.action, two.windows, two.steps) == (one.action, one.windows, one.steps)
        assert two.speedup == pytest.approx(one.speedup, rel=1e-12)
        assert two.speedup_ci == pytest.approx(one.speedup_ci, rel=1e-12)


def test_summaries_of_successive_flushes_merge_to_the_summary_of_all_windows():
    steps = simulate(3, {"decode:b16": 1.0, "prefill:n1024": 1.2}, windows=10)
    first, second = [s for s in steps if s.window < 5], [s for s in steps if s.window >= 5]
    assert merge(summarise(second, "p0"), summarise(first, "p0")) == summarise(steps, "p0")


def test_merge_counts_a_redelivered_pair_once_and_refuses_a_conflicting_one():
    pairs = summarise(simulate(1, {"decode:b16": 1.0}, windows=8), "p0")
    assert merge(pairs, pairs) == pairs
    with pytest.raises(ValueError, match="conflicting summaries for step kind 'decode:b16', source 'p0', window 0"):
        merge(pairs, [WindowPair("decode:b16", "p0", 0, 1.0, 1.0, 1, 1)])


def test_summary_leaves_out_a_window_that_one_arm_has_not_served_yet():
    steps = [Step(0, "candidate", "decode:b16", 10.0), Step(0, "incumbent", "decode:b16", 12.0),
             Step(1, "incumbent", "decode:b16", 11.0)]
    assert summarise(steps, "p0") == (WindowPair("decode:b16", "p0", 0, 10.0, 12.0, 1, 1),)


def test_window_median_ignores_a_burst_inside_a_slot():
    steps = [Step(0, "incumbent", "k", t) for t in (10.0, 10.0, 10.0)]
    steps += [Step(0, "candidate", "k", t) for t in (9.0, 9.0, 90.0)]
    assert summarise(steps, "p0")[0].candidate_us == 9.0


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("time_us", [-1.0, 0.0, math.nan, math.inf])
def test_summarise_refuses_a_step_time_that_is_not_a_positive_time(time_us):
    with pytest.raises(ValueError, match=r"time_us of a 'decode:b16' step in window 3 must be a finite positive"):
        summarise([Step(3, "candidate", "decode:b16", time_us)], "p0")


def test_summarise_refuses_an_unknown_arm():
    with pytest.raises(ValueError, match="unknown arm 'baseline'"):
        summarise([Step(0, "baseline", "decode:b16", 10.0)], "p0")


@pytest.mark.parametrize("fields, named", [
    ({"candidate_us": math.nan}, "candidate_us"),
    ({"incumbent_us": -5.0}, "incumbent_us"),
    ({"candidate_steps": 0}, "candidate_steps"),
    ({"window": -1}, "window"),
    ({"step_kind": ""}, "step_kind"),
])
def test_window_pair_from_the_bus_refuses_bad_fields(fields, named):
    good = dict(step_kind="decode:b16", source="p0", window=0, candidate_us=1.0, incumbent_us=1.0,
                candidate_steps=1, incumbent_steps=1)
    with pytest.raises(ValueError, match=named):
        WindowPair(**{**good, **fields})


def test_policy_refuses_min_windows_above_max_windows():
    with pytest.raises(ValueError, match="min_windows <= max_windows"):
        Policy(min_windows=10, max_windows=8)


# --- schedule and t quantile ---------------------------------------------------------------------

def test_schedule_is_abba_without_seed():
    assert [arm_for_slot(s)[0] for s in range(8)] == list("ciicciic")


def test_seeded_schedule_serves_both_arms_each_window_in_a_reproducible_random_order():
    orders = [(arm_for_slot(2 * w, 7), arm_for_slot(2 * w + 1, 7)) for w in range(40)]
    assert all(set(order) == {"candidate", "incumbent"} for order in orders)
    assert len(set(orders)) == 2  # both orders occur
    assert orders == [(arm_for_slot(2 * w, 7), arm_for_slot(2 * w + 1, 7)) for w in range(40)]
    assert orders != [(arm_for_slot(2 * w, 8), arm_for_slot(2 * w + 1, 8)) for w in range(40)]


@pytest.mark.parametrize("p, df, table", [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182),
                                           (0.975, 10, 2.228), (0.999, 3, 10.215), (0.9995, 5, 6.869)])
def test_t_quantile_matches_the_table(p, df, table):
    assert student_t_quantile(p, df) == pytest.approx(table, abs=1e-3)
