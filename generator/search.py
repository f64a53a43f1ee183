"""Parameter search over an op's SPACE: which template points to benchmark next.

Round 0 starts with up to half its points from the op's SEEDS (points that won on real hardware
before, where the op lists any and its prune keeps them for this profile), then spreads the rest
over every dimension of the space; later rounds step one notch along one dimension from the best
points so far, plus a little random exploration. Everything here is
pure and seeded by the campaign id, so a redelivered hypothesis or refine yields the same
variants with the same event ids, and JetStream drops the second copy.
"""
import hashlib
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from shared import variants
from shared.schemas import Campaign, Scored, VariantReady

log = logging.getLogger("kernelloop.generator")

Point = tuple[int, ...]  # one index into each of SPACE's ordered value lists

# Beyond this many points the space is sampled instead of enumerated for round 0 and exploration.
MAX_ENUMERATED = 4096
# Neighbours are taken from this many of the best points: more spreads a round too thin.
MAX_PARENTS = 3
# A template that fails the static checks this often is broken everywhere: stop asking it.
MAX_REJECTED = 32


@dataclass(frozen=True)
class Request:
    """What a strategy may know when it proposes a round."""

    op: ModuleType
    campaign: Campaign
    round: int
    n: int
    tried: frozenset[str]
    best: list[Scored]
    rng: random.Random = field(compare=False)


@dataclass(frozen=True)
class Candidate:
    params: dict[str, Any]
    source: str
    strategy: str  # a shared.schemas.Strategy value
    parents: list[str]


class Strategy(Protocol):
    """A generator of candidates in order of preference; propose_round takes the first n that are
    new and pass the static checks, so a strategy may yield more than n."""

    def propose(self, request: Request) -> Iterator[Candidate]: ...


class ParameterSearch:
    """Points of the op's TEMPLATE: coverage first, then local steps from the best."""

    def propose(self, request: Request) -> Iterator[Candidate]:
        space = _Space(request)
        if request.round == 0:
            seeds = space.seeds()[:max(1, request.n // 2)]
            for point in seeds:
                yield space.candidate(point, "grid", [])
            for point in space.spread([p for p in space.pool() if p not in seeds]):
                yield space.candidate(point, "grid", [])
            return
        local = space.neighbours()
        n_explore = request.n // 4 if request.n >= 2 else 0  # a quarter of the round looks elsewhere
        n_local = request.n - n_explore
        for point, parents in local[:n_local]:
            yield space.candidate(point, "local", parents)
        near = {point for point, _ in local}
        explore = [p for p in space.pool() if p not in near]
        request.rng.shuffle(explore)
        for point in explore:
            yield space.candidate(point, "local", [])
        # the space far from the best is used up: take the remaining neighbours after all
        for point, parents in local[n_local:]:
            yield space.candidate(point, "local", parents)


# Other generators (evolution, an LLM) register here under their own name.
STRATEGIES: dict[str, Strategy] = {"params": ParameterSearch()}


def propose_round(op_module: ModuleType, campaign: Campaign, round: int, n: int, tried: set[str],
                  best: list[Scored], seed: str | int | None = None,
                  strategy: "str | Strategy" = "params") -> list[VariantReady]:
    """Up to n new variants for this round, none in tried, each statically checked; [] when the
    space holds nothing new. seed defaults to the campaign id; strategy is a name in STRATEGIES or
    a strategy object built for this round (one that carries per-campaign state, like the LLM's)."""
    seed = campaign.campaign_id if seed is None else seed
    request = Request(op=op_module, campaign=campaign, round=round, n=n, tried=frozenset(tried),
                      best=list(best), rng=random.Random(f"{seed}:{round}"))
    accepted: list[tuple[str, Candidate]] = []
    seen = set(request.tried)
    rejected = 0
    strategy_impl = STRATEGIES[strategy] if isinstance(strategy, str) else strategy
    for candidate in strategy_impl.propose(request):
        vid = variants.variant_id(candidate.source, candidate.params)
        if vid in seen:
            continue
        seen.add(vid)
        problems = variants.static_problems(candidate.source)
        if problems:
            log.warning("campaign %s: dropped variant %s %s: %s", campaign.campaign_id, vid,
                        candidate.params, "; ".join(problems))
            rejected += 1
            if rejected >= MAX_REJECTED:
                break
            continue
        accepted.append((vid, candidate))
        if len(accepted) >= n:
            break  # stop here: a strategy's next candidate may cost real work (an LLM call)
    return [
        VariantReady(
            event_id=variant_event_id(campaign.campaign_id, round, vid),
            campaign=campaign,
            variant_id=vid,
            source=c.source,
            params=c.params,
            strategy=c.strategy,
            parents=c.parents,
            round=round,
            round_size=len(accepted),
        )
        for vid, c in accepted
    ]


def variant_event_id(campaign_id: str, round: int, vid: str) -> str:
    event_id = f"variant-{campaign_id}-{round}-{vid}"
    if len(event_id) > 128:  # the schema's limit; a hand-named campaign may be long
        event_id = f"variant-{hashlib.sha256(campaign_id.encode()).hexdigest()[:32]}-{round}-{vid}"
    return event_id


class _Space:
    """An op's SPACE as index points, with what this request must never propose."""

    def __init__(self, request: Request):
        self.request = request
        self.op = request.op
        self.names = list(self.op.SPACE)
        self.values = [list(self.op.SPACE[name]) for name in self.names]
        self.excluded_ids = set(request.tried)
        self.excluded_points = set()
        incumbent = request.campaign.incumbent
        if incumbent.variant_id:
            self.excluded_ids.add(incumbent.variant_id)
        if incumbent.params:
            self.excluded_points.add(self.point_of(incumbent.params))
        if incumbent.variant_id is None:
            # the fallback is the template's default config: it is already the baseline
            self.excluded_points.add(self.point_of(getattr(self.op, "DEFAULT", {})))
        self._prune = getattr(self.op, "prune", None)
        self._ids: dict[Point, str] = {}

    def params(self, point: Point) -> dict[str, Any]:
        return {name: values[i] for name, values, i in zip(self.names, self.values, point)}

    def point_of(self, params: dict[str, Any]) -> Point | None:
        """The point of a params dict, or None when it is not a point of this SPACE."""
        if set(params) != set(self.names):
            return None
        try:
            return tuple(values.index(params[name]) for name, values in zip(self.names, self.values))
        except ValueError:
            return None

    def source(self, point: Point) -> str:
        return variants.render(self.op.TEMPLATE, self.params(point))

    def candidate(self, point: Point, strategy: str, parents: list[str]) -> Candidate:
        return Candidate(self.params(point), self.source(point), strategy, parents)

    def allowed(self, point: Point) -> bool:
        if point in self.excluded_points:
            return False
        if self._prune is not None and self._prune(self.params(point), self.request.campaign.profile):
            return False
        if point not in self._ids:
            params = self.params(point)
            self._ids[point] = variants.variant_id(self.source(point), params)
        return self._ids[point] not in self.excluded_ids

    def pool(self) -> list[Point]:
        """Every allowed point, in a seeded order; a sample of them when the space is huge."""
        sizes = [len(v) for v in self.values]
        total = 1
        for size in sizes:
            total *= size
        rng = self.request.rng
        if total <= MAX_ENUMERATED:
            points = list(itertools.product(*(range(s) for s in sizes)))
        else:
            points = list({tuple(rng.randrange(s) for s in sizes) for _ in range(MAX_ENUMERATED)})
            points.sort()
        rng.shuffle(points)
        return [p for p in points if self.allowed(p)]

    def seeds(self) -> list[Point]:
        """The op's SEEDS that are points of its SPACE and allowed here, in the op's order."""
        points = [self.point_of(p) for p in getattr(self.op, "SEEDS", [])]
        return list(dict.fromkeys(p for p in points if p is not None and self.allowed(p)))

    def spread(self, pool: list[Point]) -> Iterator[Point]:
        """Greedy coverage: each next point uses the values seen least so far in every dimension,
        then lies farthest from the points already taken; the seeded pool order breaks ties."""
        counts = [[0] * len(v) for v in self.values]
        taken: list[Point] = []
        left = list(pool)
        while left:
            best_i, best_key = 0, None
            for i, point in enumerate(left):
                # value uses scaled by the dimension's size: overuse relative to a fair share
                overuse = sum(counts[d][v] * len(self.values[d]) for d, v in enumerate(point))
                key = (overuse, -self._distance(point, taken))
                if best_key is None or key < best_key:
                    best_i, best_key = i, key
            point = left.pop(best_i)
            for d, v in enumerate(point):
                counts[d][v] += 1
            taken.append(point)
            yield point

    def _distance(self, point: Point, taken: list[Point]) -> float:
        if not taken:
            return 0.0
        spans = [max(len(v) - 1, 1) for v in self.values]
        return min(sum(abs(a - b) / s for a, b, s in zip(point, other, spans)) for other in taken)

    def neighbours(self) -> list[tuple[Point, list[str]]]:
        """Allowed points one step along one dimension from the best, taken round-robin over the
        best points (best first) so a noisy ranking does not put the whole round on one point."""
        parents = []
        for scored in self.request.best:
            point = self.point_of(scored.params)
            if point is not None and all(p != point for p, _ in parents):
                parents.append((point, scored.variant_id))
            if len(parents) == MAX_PARENTS:
                break
        per_parent = []
        for point, _ in parents:
            steps = []
            for d, i in enumerate(point):
                for j in (i - 1, i + 1):
                    if 0 <= j < len(self.values[d]):
                        steps.append(point[:d] + (j,) + point[d + 1:])
            self.request.rng.shuffle(steps)
            per_parent.append(steps)
        found: dict[Point, list[str]] = {}
        for steps in itertools.zip_longest(*per_parent):
            for step in steps:
                if step is not None and step not in found and self.allowed(step):
                    found[step] = [vid for p, vid in parents if _adjacent(p, step)]
        return list(found.items())


def _adjacent(a: Point, b: Point) -> bool:
    return sum(abs(x - y) for x, y in zip(a, b)) == 1
