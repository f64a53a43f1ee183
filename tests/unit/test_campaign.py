"""Campaign round state: duplicates, round completion, refine contents, budgets, approval."""
import pytest

from deployer.campaign import AUTO_GATE, grant_approval, mark_deployed, mark_refined, record, refine_event
from shared.hardware import fingerprint
from shared.ops import get_op
from shared.registry import campaign_key
from shared.schemas import BenchResult, Budget, Campaign, CampaignState, KernelKey, WeightedShape
from shared.variants import render, source_sha256, variant_id

OP = get_op("rmsnorm")
HARDWARE = fingerprint()
CAMPAIGN = Campaign(
    campaign_id="c-rounds",
    key=KernelKey(hardware=HARDWARE.key, op="rmsnorm", dtype="float32", bucket="h1024-r16"),
    profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
    budget=Budget(rounds=2, variants_per_round=3),
)
MARGIN = 0.02


def bench(block: int, speedup: float | None = 1.0, low: float | None = 0.95, *, round_: int = 0,
          round_size: int = 3, status: str = "ok", error: str | None = None, warps: int = 4) -> BenchResult:
    params = {**OP.DEFAULT, "BLOCK": block, "num_warps": warps}
    source = render(OP.TEMPLATE, params)
    return BenchResult(campaign=CAMPAIGN, variant_id=variant_id(source, params), source=source,
                       measured_sha256=source_sha256(source), params=params,
                       strategy="grid", round=round_, round_size=round_size, status=status, error=error,
                       weighted_speedup=speedup, speedup_ci_low=low, hardware=HARDWARE)


def feed(results: list[BenchResult], state: CampaignState | None = None, require_approval: bool = False):
    step = None
    for r in results:
        state, step = record(state, r, MARGIN, require_approval, trace_id="ab" * 16)
    return state, step


def test_duplicate_result_with_new_event_id_is_ignored():
    first = bench(1024)
    state, _ = feed([first])
    again = first.model_copy(update={"event_id": "redelivered-by-a-new-publish"})
    state2, step = record(state, again, MARGIN, False)
    assert not step.changed
    assert state2 == state and len(state2.results[0]) == 1


def test_round_completes_at_round_size():
    state, step = feed([bench(256), bench(512)])
    assert step.decision is None and state.rounds_done == 0 and state.pending is None
    state, step = feed([bench(1024)], state)
    assert step.decision is not None
    assert state.rounds_done == 1 and 0 not in state.results and state.closed == [0]


def test_winning_round_asks_for_a_deploy_by_the_gate():
    fast = bench(1024, 1.4, 1.3)
    state, step = feed([bench(256), fast, bench(512, status="incorrect", speedup=None, low=None)])
    assert step.decision.deploy
    assert state.pending == "deploy" and state.approved_by == AUTO_GATE and state.status == "running"
    assert state.winner.variant_id == fast.variant_id and state.winner.source == fast.source
    assert state.trace_id == "ab" * 16
    state = mark_deployed(state, revision=7)
    assert state.status == "deployed" and state.pending is None and state.deployed_revision == 7


def test_refine_carries_failures_and_tried_ids():
    slow = bench(256, 1.01, 0.97)
    wrong = bench(512, None, None, status="incorrect", error="max error 0.4 on [3, 1000]")
    broken = bench(2048, None, None, status="compile_error", error="BLOCK too large")
    state, step = feed([slow, wrong, broken])
    assert not step.decision.deploy and state.pending == "refine" and state.status == "running"
    refine = refine_event(state)
    assert refine.event_id == "refine-c-rounds-1"
    assert refine.round == 1 and refine.rounds_left == 1
    assert set(refine.tried) == {slow.variant_id, wrong.variant_id, broken.variant_id}
    assert {(f.variant_id, f.status, f.error) for f in refine.failures} == {
        (wrong.variant_id, "incorrect", "max error 0.4 on [3, 1000]"),
        (broken.variant_id, "compile_error", "BLOCK too large"),
    }
    assert [b.variant_id for b in refine.best] == [slow.variant_id]
    assert mark_refined(state, 1).pending is None


def test_campaign_is_exhausted_after_budget_rounds():
    state, _ = feed([bench(256), bench(512), bench(1024)])
    state = mark_refined(state, 1)
    state, step = feed([bench(256, warps=8, round_=1), bench(512, warps=8, round_=1),
                        bench(1024, 1.02, 1.001, warps=8, round_=1)], state)
    assert state.status == "exhausted" and state.pending is None
    assert "2 rounds" in state.reason
    assert state.rounds_done == 2 and len(state.tried) == 6
    # Nothing moves an exhausted campaign any more.
    _, late = record(state, bench(4096, 2.0, 1.9, round_=2), MARGIN, False)
    assert not late.changed


def test_late_result_of_a_closed_round_is_ignored():
    state, _ = feed([bench(256), bench(512), bench(1024)])
    _, step = record(state, bench(4096, 2.0, 1.9), MARGIN, False)
    assert not step.changed


def test_result_whose_source_does_not_match_its_id_cannot_win():
    forged = bench(1024, 3.0, 2.8).model_copy(update={"source": render(OP.TEMPLATE, {**OP.DEFAULT, "BLOCK": 4096})})
    state, step = feed([forged], state=None)
    state, step = feed([bench(256), bench(512)], state)
    assert not step.decision.deploy
    assert state.failures[0].status == "rejected" and "hashes to" in state.failures[0].error


def test_required_approval_holds_the_winner_until_granted():
    fast = bench(1024, 1.4, 1.3)
    state, step = feed([bench(256), fast, bench(512)], require_approval=True)
    assert step.decision.deploy
    assert state.status == "awaiting_approval" and state.pending is None
    approved = grant_approval(state, "alice")
    assert approved.pending == "deploy" and approved.approved_by == "alice"
    with pytest.raises(ValueError, match="not awaiting approval"):
        grant_approval(approved, "bob")


def test_state_survives_its_json_round_trip():
    state, _ = feed([bench(256), bench(512)])
    assert CampaignState.model_validate_json(state.model_dump_json()) == state


def test_campaign_key_is_a_valid_kv_key_for_any_campaign_id():
    assert campaign_key("0123abcd") == "0123abcd"
    assert campaign_key("my campaign*") != "my campaign*" and " " not in campaign_key("my campaign*")
