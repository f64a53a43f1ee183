"""The gate: deploy only a correct candidate whose speedup's lower CI bound clears 1 + margin."""
import hashlib

from deployer.gate import decide, refusal
from shared.hardware import fingerprint
from shared.ops import get_op
from shared.schemas import BenchResult, Budget, Campaign, KernelKey, WeightedShape
from shared.variants import render, variant_id

OP = get_op("rmsnorm")
HARDWARE = fingerprint()
CAMPAIGN = Campaign(
    campaign_id="c-gate",
    key=KernelKey(hardware=HARDWARE.key, op="rmsnorm", dtype="float32", bucket="h1024-r16"),
    profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
    budget=Budget(rounds=2, variants_per_round=3),
)
MARGIN = 0.02


def bench(block: int, speedup: float | None, low: float | None, high: float | None = None, *,
          status: str = "ok", error: str | None = None, hardware=HARDWARE) -> BenchResult:
    params = {**OP.DEFAULT, "BLOCK": block}
    source = render(OP.TEMPLATE, params)
    return BenchResult(campaign=CAMPAIGN, variant_id=variant_id(source, params), source=source, params=params,
                       strategy="grid", round=0, round_size=3, status=status, error=error,
                       weighted_speedup=speedup, speedup_ci_low=low,
                       speedup_ci_high=high if high is not None else (speedup and speedup + 0.05),
                       hardware=hardware, measured_sha256=hashlib.sha256(source.encode()).hexdigest())


def test_gate_refuses_speedup_inside_noise():
    # A 10% median whose interval reaches down to 1.01: not beyond the 2% margin.
    noisy = bench(1024, 1.10, 1.01, 1.19)
    decision = decide([noisy], MARGIN)
    assert not decision.deploy and decision.winner is None
    assert decision.best is noisy
    assert noisy.variant_id in decision.reason and "1.010" in decision.reason


def test_gate_deploys_speedup_whose_lower_bound_clears_margin():
    fast = bench(1024, 1.30, 1.21)
    decision = decide([fast, bench(256, 0.9, 0.85)], MARGIN)
    assert decision.deploy and decision.winner is fast
    assert fast.variant_id in decision.reason and "1.210" in decision.reason


def test_gate_refuses_lower_bound_exactly_at_margin():
    assert not decide([bench(1024, 1.05, 1.0 + MARGIN)], MARGIN).deploy


def test_gate_refuses_incorrect_and_crashed_even_with_a_speedup():
    wrong = bench(1024, 2.0, 1.9, status="incorrect", error="max error 0.3 > 1e-5 on [3, 1000]")
    crashed = bench(2048, 3.0, 2.9, status="crashed", error="worker exited with signal 11")
    decision = decide([wrong, crashed], MARGIN)
    assert not decision.deploy and decision.best is None
    assert "1 crashed" in decision.reason and "1 incorrect" in decision.reason


def test_gate_picks_best_weighted_speedup_of_several():
    results = [bench(256, 1.20, 1.10), bench(1024, 1.50, 1.35), bench(2048, 1.30, 1.25),
               bench(4096, 1.90, 0.99)]  # fastest median, but inside the noise
    decision = decide(results, MARGIN)
    assert decision.deploy and decision.winner is results[1]
    assert decision.best is results[3]


def test_gate_breaks_a_tie_on_the_higher_lower_bound():
    loose, tight = bench(1024, 1.40, 1.10), bench(2048, 1.40, 1.30)
    assert decide([loose, tight], MARGIN).winner is tight
    assert decide([tight, loose], MARGIN).winner is tight


def test_gate_refuses_speedup_measured_on_other_hardware():
    elsewhere = HARDWARE.model_copy(update={"key": "nvidia-a10g"})
    decision = decide([bench(1024, 1.5, 1.4, hardware=elsewhere)], MARGIN)
    assert not decision.deploy and "nvidia-a10g" in decision.reason


def test_gate_refuses_empty_round():
    assert not decide([], MARGIN).deploy


# ---- what is deployed is what was measured ----------------------------------------------------


def measured(result: BenchResult, source: str | None = None) -> BenchResult:
    return result.model_copy(update={"measured_sha256": hashlib.sha256((source or result.source).encode()).hexdigest()})


def test_gate_deploys_a_result_whose_measured_hash_is_its_source():
    fast = measured(bench(1024, 1.30, 1.21))
    assert decide([fast], MARGIN).winner is fast


def test_gate_refuses_a_result_whose_measured_code_is_not_the_source_it_carries():
    fast = bench(1024, 1.30, 1.21)
    other = render(OP.TEMPLATE, {**OP.DEFAULT, "BLOCK": 2048})
    swapped = measured(fast, source=other)  # the worker ran other code than the source sent for deploy
    decision = decide([swapped], MARGIN)
    assert not decision.deploy
    assert "measured code with sha256" in decision.reason


def test_gate_refuses_a_source_that_does_not_hash_to_its_variant_id():
    fast = measured(bench(1024, 1.30, 1.21))
    other = render(OP.TEMPLATE, {**OP.DEFAULT, "BLOCK": 2048})
    forged = measured(fast.model_copy(update={"source": other}))  # hashes agree; the id does not
    assert "not " + fast.variant_id in refusal(forged, MARGIN)
    assert not decide([forged], MARGIN).deploy


def test_gate_refuses_a_result_that_does_not_say_which_code_was_measured():
    unsigned = bench(1024, 1.30, 1.21).model_copy(update={"measured_sha256": None})
    assert "no hash of the code" in refusal(unsigned, MARGIN)
    assert not decide([unsigned], MARGIN).deploy


def test_gate_never_redeploys_a_variant_withdrawn_from_the_key():
    rolled_back, next_best = bench(1024, 1.50, 1.35), bench(2048, 1.30, 1.25)
    why = {rolled_back.variant_id: "rolled back at revision 3 (rollback: live regression)"}
    decision = decide([rolled_back, next_best], MARGIN, withdrawn=why)
    assert decision.deploy and decision.winner is next_best
    alone = decide([rolled_back], MARGIN, withdrawn=why)
    assert not alone.deploy and "rolled back at revision 3" in alone.reason


def test_withdrawn_variants_are_those_a_rollback_or_a_removal_took_off():
    from datetime import datetime, timezone

    from shared.registry import Revision, withdrawn
    from shared.schemas import RegistryEntry

    def entry(vid, by="auto-gate", previous=None):
        return RegistryEntry(variant_id=vid, source="", speedup=1.5, campaign_id="c", approved_by=by,
                             previous_variant_id=previous, deployed_at=datetime(2026, 1, 1, tzinfo=timezone.utc))

    history = [Revision(1, entry("a")), Revision(2, entry("b", previous="a")),  # a replaced by a better b
               Revision(3, entry("a", by="rollback: live regression", previous="b")),  # b rolled back
               Revision(4, entry("c", previous="a")), Revision(5, None)]  # c removed: the fallback serves
    out = withdrawn(history)
    assert set(out) == {"b", "c"} and "revision 3" in out["b"] and "removed" in out["c"]
    assert withdrawn([]) == {} and withdrawn([Revision(1, entry("a"))]) == {}


def test_a_persons_rollback_withdraws_the_variant_it_took_off():
    """`kernelloop rollback KEY --by erin` writes the earlier entry approved by erin, not by "rollback"."""
    from datetime import datetime, timezone

    from shared.registry import Revision, withdrawn
    from shared.schemas import RegistryEntry

    def entry(vid, by="auto-gate", previous=None):
        return RegistryEntry(variant_id=vid, source="", speedup=1.5, campaign_id="c", approved_by=by,
                             previous_variant_id=previous, deployed_at=datetime(2026, 1, 1, tzinfo=timezone.utc))

    history = [Revision(1, entry("a")), Revision(2, entry("b", previous="a")), Revision(3, entry("c", previous="b")),
               Revision(4, entry("a", by="erin", previous="c"))]  # `--to 1`: back past b to a
    assert set(withdrawn(history)) == {"c"} and "(erin)" in withdrawn(history)["c"]
    approved = history[:2] + [Revision(3, entry("b", by="dave", previous="a"))]  # b re-approved in place
    assert withdrawn(approved) == {}
