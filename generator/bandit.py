"""Which strategy gets the next round: a UCB1 bandit per op over the strategies that can run.

The reward of a round is the relative gain it brought to the campaign's best lower-bound speedup
(0 when it found nothing better, 1 at most), so a strategy that keeps finding wins is chosen more,
and one that has not been tried for a while gets another look. One bandit per op: what pays for a
memory-bound norm need not pay for a matmul.
"""
import math
import random
from dataclasses import dataclass, field

# Rewards are relative gains, mostly well under 0.5: a smaller exploration weight than UCB1's
# sqrt(2) keeps a strategy that won once from being starved by pure curiosity.
EXPLORATION = 0.5


def reward(best_before: float, best_after: float) -> float:
    if best_before <= 0:
        return 0.0
    return min(max((best_after - best_before) / best_before, 0.0), 1.0)


@dataclass
class Bandit:
    pulls: dict[str, int] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)

    def choose(self, arms: list[str], rng: random.Random) -> tuple[str, dict[str, float]]:
        """The arm to pull and every arm's score (inf for one never tried); arms keep their order
        of preference among the untried."""
        if not arms:
            raise ValueError("no strategy can run")
        n = sum(self.pulls.get(a, 0) for a in arms)
        scores = {}
        for a in arms:
            k = self.pulls.get(a, 0)
            scores[a] = math.inf if k == 0 else self.total.get(a, 0.0) / k + EXPLORATION * math.sqrt(2 * math.log(n) / k)
        untried = [a for a in arms if scores[a] == math.inf]
        if untried:
            return untried[0], scores
        top = max(scores.values())
        return rng.choice([a for a in arms if scores[a] == top]), scores

    def pull(self, arm: str) -> None:
        """Count the choice now (its reward comes when the round's results are in), so a second
        round chosen meanwhile sees the arm as tried."""
        self.pulls[arm] = self.pulls.get(arm, 0) + 1

    def credit(self, arm: str, value: float) -> None:
        self.total[arm] = self.total.get(arm, 0.0) + value

    def to_dict(self) -> dict:
        return {"pulls": self.pulls, "total": self.total}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Bandit":
        data = data or {}
        return cls(dict(data.get("pulls", {})), dict(data.get("total", {})))
