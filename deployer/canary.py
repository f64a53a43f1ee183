"""Canary statistics: from the workload's own step times (one model forward), decide whether a
deployed kernel made the step faster beyond the noise (promote), slower or not faster (withdraw),
or whether more windows are needed (continue). Plain code: a workload summarises, the deployer
merges every process's summaries and decides.

Method. The arms take turns in slots (arm_for_slot, shared/canary.py with the summary both sides
use); slots 2w and 2w+1 are window w, in which each arm serves once. Per window and step kind each
arm gives one number, its median step time, so a burst (GC pause, a neighbour's traffic) inside a
slot moves it little; the decision is on the
paired per-window log ratios log(candidate / incumbent), which cancel drift both arms share. Their
20% trimmed mean with the Tukey-McLaughlin (Yuen) standard error and an exact Student t quantile
gives the interval; trimming drops windows that a long burst hit on one side only. The canary is
looked at after every window, so each look spends alpha / (max_windows - min_windows + 1) per tail
(Bonferroni): the chance that an equal kernel is ever promoted stays under alpha.

Step kinds ("decode:b16", "prefill:n1024") are judged one by one, then combined weighted by their
share of step time; a kind that is clearly slower withdraws the canary whatever the others gain.
Kinds with fewer than min_windows windows are not judged and left out of the combination.
"""
import functools
import math
import statistics
from dataclasses import dataclass, replace
from typing import Iterable, Literal

# Re-exported: the deployer's callers and tests name them here.
from shared.canary import ARMS, Arm, Step, WindowPair, arm_for_slot, merge, summarise  # noqa: F401

Action = Literal["promote", "withdraw", "continue"]


@dataclass(frozen=True)
class Policy:
    min_windows: int = 6  # no verdict before: a 20% trim of fewer windows trims nothing
    max_windows: int = 40  # not promotable by then: withdraw, an equal kernel is not worth a deploy
    min_gain: float = 0.005  # promote when the time ratio's upper bound is below 1 - min_gain
    tolerance: float = 0.02  # withdraw early when its lower bound is above 1 + tolerance
    alpha: float = 0.05  # per tail, over all looks of one canary
    trim: float = 0.2

    def __post_init__(self) -> None:
        if not 3 <= self.min_windows <= self.max_windows:
            raise ValueError(f"need 3 <= min_windows <= max_windows, got {self.min_windows}, {self.max_windows}")
        if not (0 < self.alpha < 0.5 and 0 <= self.trim < 0.25):
            raise ValueError(f"need 0 < alpha < 0.5 and 0 <= trim < 0.25, got {self.alpha}, {self.trim}")

    @property
    def look_alpha(self) -> float:
        return self.alpha / (self.max_windows - self.min_windows + 1)


@dataclass(frozen=True)
class Verdict:
    action: Action
    step_kind: str  # "all" for the combined verdict
    speedup: float  # incumbent / candidate step time: > 1 means the candidate is faster
    speedup_ci: tuple[float, float]  # at level 1 - 2 * look_alpha; (0, inf) before min_windows
    windows: int
    steps: int
    reason: str
    slower: bool = False  # clearly slower (not merely not faster): blocks the other kinds' gain
    kinds: tuple["Verdict", ...] = ()  # the per-kind verdicts behind a combined one


def student_t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for integer df, exact (Abramowitz & Stegun 26.7.3-4): scipy is not available,
    and a normal quantile is far too narrow at the 3-10 degrees of freedom of a young canary."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term, total = (math.cos(theta), 0.0) if df % 2 else (1.0, 0.0)
    for k in range((df - 1) // 2 if df % 2 else df // 2):
        total += term
        term *= c2 * ((2 * k + 2) / (2 * k + 3) if df % 2 else (2 * k + 1) / (2 * k + 2))
    if df % 2:
        return 2 / math.pi * (theta + math.sin(theta) * total)
    return math.sin(theta) * total


@functools.cache  # every look asks for the same few (p, df)
def student_t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, for 0.5 <= p < 1, by bisection on the exact CDF."""
    low, high = 0.0, 1e7
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf_two_sided(mid, df) < 2 * p - 1 else (low, mid)
    return high


@dataclass(frozen=True)
class _Estimate:
    mean: float  # trimmed mean of log(candidate / incumbent)
    se: float
    df: int
    windows: int
    steps: int
    weight_us: float  # the kind's step time, both arms' steps at the incumbent's median


def _estimate(pairs: list[WindowPair], trim: float) -> _Estimate:
    x = sorted(p.log_ratio for p in pairs)  # sorted first: merge order must not change the sums
    n = len(x)
    g = int(trim * n)
    h = n - 2 * g
    winsorised = [x[g]] * g + x[g:n - g] + [x[n - g - 1]] * g
    se = math.sqrt((n - 1) * statistics.variance(winsorised) / (h * (h - 1))) if h > 1 else math.inf
    return _Estimate(statistics.fmean(x[g:n - g]), se, max(h - 1, 1), n,
                     sum(p.candidate_steps + p.incumbent_steps for p in pairs),
                     math.fsum(p.incumbent_us * (p.candidate_steps + p.incumbent_steps) for p in pairs))


def _judge(est: _Estimate, step_kind: str, policy: Policy) -> Verdict:
    if est.windows < policy.min_windows:
        return Verdict("continue", step_kind, math.exp(-est.mean), (0.0, math.inf), est.windows, est.steps,
                       f"{step_kind}: {est.windows} of {policy.min_windows} windows before a verdict")
    half = student_t_quantile(1 - policy.look_alpha, est.df) * est.se
    low, high = math.exp(est.mean - half), math.exp(est.mean + half)  # candidate / incumbent time
    verdict = Verdict("continue", step_kind, math.exp(-est.mean), (1 / high, 1 / low), est.windows, est.steps, "")
    ci = f"speedup {verdict.speedup:.3f}x, CI [{1 / high:.3f}, {1 / low:.3f}] over {est.windows} windows"
    if low > 1 + policy.tolerance:
        return replace(verdict, action="withdraw", slower=True, reason=f"{step_kind} clearly slower: {ci}")
    if high < 1 - policy.min_gain:
        return replace(verdict, action="promote", reason=f"{step_kind} faster beyond the noise: {ci}")
    if est.windows >= policy.max_windows:
        return replace(verdict, action="withdraw", reason=f"{step_kind} not faster beyond the noise: {ci}")
    return replace(verdict, reason=f"{step_kind} undecided: {ci}")


def decide(pairs: Iterable[WindowPair], policy: Policy = Policy()) -> Verdict:
    """The canary's verdict over every pair so far, all step kinds combined by time share."""
    by_kind: dict[str, list[WindowPair]] = {}
    for pair in merge(pairs):
        by_kind.setdefault(pair.step_kind, []).append(pair)
    estimates = {kind: _estimate(kind_pairs, policy.trim) for kind, kind_pairs in sorted(by_kind.items())}
    kinds = tuple(_judge(est, kind, policy) for kind, est in estimates.items())
    ready = [est for est in estimates.values() if est.windows >= policy.min_windows]
    if not ready:
        windows = max((est.windows for est in estimates.values()), default=0)
        return Verdict("continue", "all", math.nan, (0.0, math.inf), windows, sum(v.steps for v in kinds),
                       f"no step kind has {policy.min_windows} windows yet", kinds=kinds)
    total = math.fsum(est.weight_us for est in ready)
    weights = [est.weight_us / total for est in ready]
    # Windows are shared by the kinds that ran in them, so the largest count is the canary's length.
    combined = _Estimate(math.fsum(w * e.mean for w, e in zip(weights, ready)),
                         math.sqrt(math.fsum((w * e.se) ** 2 for w, e in zip(weights, ready))),
                         min(e.df for e in ready), max(e.windows for e in ready), sum(e.steps for e in ready), total)
    verdict = replace(_judge(combined, "all", policy), kinds=kinds)
    if slow := [v.step_kind for v in kinds if v.slower]:
        return replace(verdict, action="withdraw", slower=True,
                       reason=f"{', '.join(slow)} clearly slower, blocking the whole step ({verdict.reason})")
    return verdict
