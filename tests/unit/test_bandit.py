"""The strategy bandit: every strategy is tried once, then the one whose rounds gain is chosen most,
and a round's reward is its relative gain over the campaign's best before it."""
import random

import pytest

from generator.bandit import Bandit, reward


def test_reward_is_the_relative_gain_clipped_to_zero_and_one():
    assert reward(1.0, 1.25) == pytest.approx(0.25)
    assert reward(1.2, 1.1) == 0.0
    assert reward(1.0, 5.0) == 1.0


def test_untried_strategies_come_first_in_their_order():
    bandit = Bandit()
    arm, scores = bandit.choose(["params", "llm"], random.Random(0))
    assert arm == "params" and scores == {"params": float("inf"), "llm": float("inf")}
    bandit.pull("params")
    assert bandit.choose(["params", "llm"], random.Random(0))[0] == "llm"


def test_the_strategy_that_pays_is_chosen_most():
    rng, bandit = random.Random(1), Bandit()
    gains = {"params": 0.02, "llm": 0.3, "crossover": 0.0}
    chosen = []
    for _ in range(40):
        arm, _ = bandit.choose(list(gains), rng)
        bandit.pull(arm)
        bandit.credit(arm, gains[arm])
        chosen.append(arm)
    assert chosen[-20:].count("llm") > 12
    assert set(chosen) == set(gains)  # each was tried


def test_state_round_trips_through_a_dict():
    bandit = Bandit()
    bandit.pull("llm")
    bandit.credit("llm", 0.5)
    assert Bandit.from_dict(bandit.to_dict()) == bandit
    with pytest.raises(ValueError, match="no strategy"):
        bandit.choose([], random.Random(0))
