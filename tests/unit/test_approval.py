"""Deploy policy and a person's decision: who must approve, what a rejection leaves, what a pending
deploy announces."""
import pytest

from deployer.campaign import approval_needed, grant_approval, record, reject_deploy
from deployer.rollout import pending_event
from shared.schemas import BenchResult, Budget, Campaign, Hardware, KernelKey, WeightedShape
from shared.variants import source_sha256, variant_id

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
HARDWARE = Hardware(key=KEY.hardware, name="cpu", interpreter=True, torch="test", triton="test")


def winner(time_share: float | None = None) -> BenchResult:
    campaign = Campaign(campaign_id="c-policy", key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                        budget=Budget(rounds=1, variants_per_round=1), time_share=time_share)
    source, params = "# variant\n", {"BLOCK": 1024}
    return BenchResult(campaign=campaign, variant_id=variant_id(source, params), source=source,
                       measured_sha256=source_sha256(source), params=params,
                       strategy="grid", round=0, round_size=1, status="ok", weighted_speedup=1.5,
                       speedup_ci_low=1.4, speedup_ci_high=1.6, hardware=HARDWARE)


@pytest.mark.parametrize("policy, share, held", [
    ("auto", 0.9, False),
    ("manual", 0.01, True),
    ("manual_above", 0.49, False),
    ("manual_above", 0.5, True),
    ("manual_above", None, True),  # unmeasured traffic is not assumed small
])
def test_deploy_policy_holds_a_winner_only_where_a_person_must_decide(policy, share, held):
    assert bool(approval_needed(policy, 0.5, share)) is held


def test_manual_above_names_the_share_that_made_it_wait():
    assert "carries 70%" in approval_needed("manual_above", 0.5, 0.7)


def test_a_rejected_winner_ends_the_campaign_with_who_and_why():
    state, _ = record(None, winner(0.7), 0.02, True, trace_id="ab" * 16, span_id="cd" * 8)
    assert state.status == "awaiting_approval" and state.span_id == "cd" * 8 and not state.announced
    rejected = reject_deploy(state, "carol", "launch freeze")
    assert rejected.status == "rejected" and rejected.pending is None and rejected.rejected_by == "carol"
    assert rejected.reason == "rejected by carol: launch freeze"
    with pytest.raises(ValueError, match="not awaiting approval"):
        grant_approval(rejected, "dave")
    with pytest.raises(ValueError, match="not awaiting approval"):
        reject_deploy(rejected, "dave")


def test_pending_event_carries_the_winner_its_share_and_why_it_waits():
    state, _ = record(None, winner(0.7), 0.02, True, trace_id="ab" * 16)
    state.reason += "; held: " + approval_needed("manual_above", 0.5, 0.7)
    event = pending_event(state)
    assert event.event_id == "pending-c-policy", "fixed per campaign, so a retry is de-duplicated"
    assert event.variant_id == state.winner.variant_id and event.speedup == 1.5 and event.time_share == 0.7
    assert event.policy.startswith("deploy policy manual_above") and event.trace_id == "ab" * 16
