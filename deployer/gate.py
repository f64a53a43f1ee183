"""The gate: given one completed round of benchmark results, deploy the best candidate only when it
ran correctly on the campaign's hardware and is faster beyond the measured noise.

"Beyond the noise" is judged on the lower bound of the speedup's confidence interval, never on the
median: a 1.05x median whose interval reaches down to 0.97x is not an improvement we can promise.
"""
from collections import Counter
from dataclasses import dataclass

from shared.schemas import BenchResult
from shared.variants import source_sha256, variant_id


@dataclass(frozen=True)
class Decision:
    deploy: bool
    winner: BenchResult | None  # the candidate to deploy; None when deploy is False
    best: BenchResult | None  # the best correct candidate, deployable or not, for the log and refine
    reason: str


def deployable(result: BenchResult, margin: float) -> bool:
    return not refusal(result, margin)


def refusal(result: BenchResult, margin: float) -> str:
    """Why a result may not be deployed, in words; empty when it may."""
    if result.status != "ok":
        return f"status {result.status}" + (f": {result.error}" if result.error else "")
    if problem := hash_problem(result):
        return problem
    if result.weighted_speedup is None or result.speedup_ci_low is None:
        return "no speedup measured"
    # A speedup measured on other hardware says nothing about the key it would be deployed on.
    if result.hardware.key != result.campaign.key.hardware:
        return f"measured on {result.hardware.key}, not on {result.campaign.key.hardware}"
    if result.speedup_ci_low <= 1.0 + margin:
        return f"CI lower bound {result.speedup_ci_low:.3f} does not clear 1 + margin = {1.0 + margin:.3f}"
    return ""


def hash_problem(result: BenchResult) -> str:
    """Why the source the result carries (and the registry would get) is not the code that was
    measured, in words; empty when it is. A result without a measured hash (a benchmarker from
    before they existed, or a hand-made event) proves nothing about what ran: it is refused."""
    actual = variant_id(result.source, result.params)
    if actual != result.variant_id:
        return f"source hashes to variant id {actual}, not {result.variant_id}"
    if result.measured_sha256 is None:
        return "the result carries no hash of the code the benchmarker measured (measured_sha256)"
    if result.measured_sha256 != source_sha256(result.source):
        return (f"the benchmarker measured code with sha256 {result.measured_sha256[:16]}..., not the source "
                f"carried for deploy (sha256 {source_sha256(result.source)[:16]}...)")
    return ""


def _rank(result: BenchResult) -> tuple[float, float]:
    # Best weighted speedup first; on a tie the tighter (higher) lower bound is the safer bet.
    return (result.weighted_speedup or 0.0, result.speedup_ci_low or 0.0)


def describe(result: BenchResult) -> str:
    low = f"{result.speedup_ci_low:.3f}" if result.speedup_ci_low is not None else "?"
    high = f"{result.speedup_ci_high:.3f}" if result.speedup_ci_high is not None else "?"
    speedup = f"{result.weighted_speedup:.3f}" if result.weighted_speedup is not None else "?"
    return f"{result.variant_id} ({speedup}x, CI [{low}, {high}])"


def decide(results: list[BenchResult], margin: float, withdrawn: dict[str, str] | None = None) -> Decision:
    """Deploy the deployable candidate with the best weighted speedup, or say why none is.
    withdrawn: variants taken off this key before (shared/registry.py), never chosen again here."""
    if not results:
        return Decision(False, None, None, "no results in the round")
    withdrawn = withdrawn or {}
    measured = [r for r in results if r.status == "ok" and r.weighted_speedup is not None]
    best = max(measured, key=_rank) if measured else None
    candidates = [r for r in measured if deployable(r, margin) and r.variant_id not in withdrawn]
    if candidates:
        winner = max(candidates, key=_rank)
        reason = f"deploy {describe(winner)}: lower bound clears 1 + margin = {1.0 + margin:.3f}"
        return Decision(True, winner, best, reason)
    if best is None:
        counts = Counter(r.status for r in results)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        return Decision(False, None, None, f"no deploy: no candidate produced a speedup ({summary})")
    why = refusal(best, margin) or f"it served this key before and was {withdrawn.get(best.variant_id)}"
    return Decision(False, None, best, f"no deploy: best candidate {describe(best)}: {why}")
