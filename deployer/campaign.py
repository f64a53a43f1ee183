"""Campaign round state: which results each round has received, the best so far, what was tried,
and what the deployer still owes the campaign (a refine or a deploy).

The transitions are pure functions over CampaignState; CampaignStore keeps the state in JetStream KV
and applies a transition with compare-and-set on the entry's revision, so two deployer replicas
handling results of the same round never lose one.
"""
import asyncio
import random
from dataclasses import dataclass
from typing import Callable, Literal, TypeVar

import nats.js.errors
from faststream.nats import NatsBroker
from nats.js.kv import KeyValue
from pydantic import BaseModel

from deployer.gate import Decision, decide
from shared import subjects
from shared.broker import replicas
from shared.registry import campaign_key, read_record
from shared.schemas import BenchResult, Campaign, CampaignState, Failure, Refine, Scored
from shared.variants import variant_id

DeployPolicy = Literal["auto", "manual", "manual_above"]
AUTO_GATE = "auto-gate"
KEEP_BEST = 8  # scored candidates handed to the next round
KEEP_FAILURES = 32  # enough for a generator to see patterns, small enough for one KV value


@dataclass(frozen=True)
class Step:
    changed: bool
    note: str
    decision: Decision | None = None  # set when this result completed a round
    fan_in: tuple[str, ...] = ()  # span ids of the round's other results, when this one closed it


def new_state(campaign: Campaign) -> CampaignState:
    return CampaignState(campaign=campaign)


def _slim(result: BenchResult) -> BenchResult:
    # Only a correct candidate can ever be deployed; a failure's source is dead weight in the KV.
    return result if result.status == "ok" else result.model_copy(update={"source": ""})


def _checked(result: BenchResult) -> BenchResult:
    """A result whose source does not hash to its id is refused here, before it can win."""
    actual = variant_id(result.source, result.params)
    if actual == result.variant_id:
        return result
    error = f"source hashes to {actual}, not to its variant id {result.variant_id}"
    return result.model_copy(update={"status": "rejected", "error": error})


def approval_needed(policy: DeployPolicy, approval_share: float, time_share: float | None) -> str:
    """Why a winner must wait for a person under the deploy policy, in words; empty when the gate
    may deploy it. An unmeasured share counts as above the threshold: unknown traffic is not small."""
    if policy == "manual":
        return "deploy policy manual: every deploy waits for a person"
    if policy == "manual_above":
        if time_share is None:
            return f"deploy policy manual_above {approval_share:.0%}: the key's time share is unknown"
        if time_share >= approval_share:
            return (f"deploy policy manual_above {approval_share:.0%}: the key carries {time_share:.0%} "
                    "of its op's time")
    return ""


def record(state: CampaignState | None, result: BenchResult, margin: float, require_approval: bool,
           trace_id: str | None = None, span_id: str | None = None,
           withdrawn: dict[str, str] | None = None) -> tuple[CampaignState, Step]:
    """Add one result; when it completes its round, let the gate decide what the campaign does next
    (never choosing a variant the registry withdrew from the key before)."""
    state = new_state(result.campaign) if state is None else state.model_copy(deep=True)
    if state.status != "running":
        return state, Step(False, f"campaign {state.campaign.campaign_id} is already {state.status}")
    received = state.results.get(result.round, {})
    if result.variant_id in received or result.variant_id in state.tried:
        return state, Step(False, f"variant {result.variant_id} of round {result.round} was already counted")
    if result.round in state.closed:
        return state, Step(False, f"round {result.round} is already closed; late result {result.variant_id} ignored")
    received = {**received, result.variant_id: _slim(_checked(result))}
    state.results[result.round] = received
    if span_id:
        state.result_spans[result.variant_id] = span_id
    if len(received) < result.round_size:
        return state, Step(True, f"round {result.round}: {len(received)} of {result.round_size} results")
    decision = decide(list(received.values()), margin, withdrawn)
    fan_in = tuple(state.result_spans.pop(v) for v in received if v in state.result_spans and v != result.variant_id)
    state.result_spans.pop(result.variant_id, None)
    state = close_round(state, result.round, decision, require_approval, trace_id)
    if decision.deploy or state.status != "running":
        state.span_id = span_id or state.span_id
    return state, Step(True, decision.reason, decision, fan_in)


def _scored(result: BenchResult) -> Scored:
    return Scored(variant_id=result.variant_id, params=result.params,
                  weighted_speedup=result.weighted_speedup, speedup_ci_low=result.speedup_ci_low)


def close_round(state: CampaignState, round_: int, decision: Decision, require_approval: bool,
                trace_id: str | None = None) -> CampaignState:
    round_results = list(state.results.pop(round_).values())
    state.rounds_done += 1
    state.closed.append(round_)
    state.tried += [r.variant_id for r in round_results]
    state.failures = (state.failures + [
        Failure(variant_id=r.variant_id, status=r.status, error=r.error, params=r.params)
        for r in round_results if r.status != "ok"
    ])[-KEEP_FAILURES:]
    scored = [_scored(r) for r in round_results
              if r.status == "ok" and r.weighted_speedup is not None and r.speedup_ci_low is not None]
    ranked = sorted(state.best + scored, key=lambda s: (s.weighted_speedup, s.speedup_ci_low), reverse=True)
    state.best = ranked[:KEEP_BEST]
    state.reason = decision.reason
    state.trace_id = trace_id or state.trace_id
    if decision.deploy:
        state.winner = decision.winner
        if require_approval:
            state.status = "awaiting_approval"
        else:
            state.pending, state.approved_by = "deploy", AUTO_GATE
    elif state.rounds_done < state.campaign.budget.rounds:
        state.pending, state.next_round = "refine", round_ + 1
    else:
        state.status = "exhausted"
        state.reason = f"budget of {state.campaign.budget.rounds} rounds spent; last round: {decision.reason}"
    return state


def refine_event(state: CampaignState) -> Refine:
    """The request for the next round; its id is fixed per round so a retry is de-duplicated."""
    campaign = state.campaign
    return Refine(
        event_id=f"refine-{campaign.campaign_id}-{state.next_round}",
        campaign=campaign,
        round=state.next_round,
        rounds_left=campaign.budget.rounds - state.rounds_done,
        best=state.best,
        failures=state.failures,
        tried=state.tried,
    )


def mark_refined(state: CampaignState, round_: int) -> CampaignState:
    state = state.model_copy(deep=True)
    if state.pending == "refine" and state.next_round == round_:
        state.pending = None
    return state


def grant_approval(state: CampaignState, who: str) -> CampaignState:
    if state.status != "awaiting_approval" or state.winner is None:
        raise ValueError(f"campaign {state.campaign.campaign_id} is {state.status}, not awaiting approval")
    state = state.model_copy(deep=True)
    state.status, state.pending, state.approved_by = "running", "deploy", who
    return state


def mark_announced(state: CampaignState) -> CampaignState:
    state = state.model_copy(deep=True)
    state.announced = True
    return state


def reject_deploy(state: CampaignState, who: str, reason: str = "") -> CampaignState:
    """A person refused the winner: the campaign ends here, nothing is deployed."""
    if state.status != "awaiting_approval":
        raise ValueError(f"campaign {state.campaign.campaign_id} is {state.status}, not awaiting approval")
    state = state.model_copy(deep=True)
    state.status, state.pending, state.rejected_by = "rejected", None, who
    state.reason = f"rejected by {who}" + (f": {reason}" if reason else "")
    return state


def mark_deployed(state: CampaignState, revision: int) -> CampaignState:
    state = state.model_copy(deep=True)
    state.status, state.pending, state.deployed_revision = "deployed", None, revision
    return state


def mark_abandoned(state: CampaignState, reason: str) -> CampaignState:
    """The winner can no longer be deployed (e.g. the incumbent it beat was replaced meanwhile)."""
    state = state.model_copy(deep=True)
    state.status, state.pending, state.reason = "exhausted", None, reason
    return state


# ---- the KV-backed store ------------------------------------------------------------------------

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


async def update_record(kv: KeyValue, key: str, model: type[M], change: Callable[[M | None], tuple[M, T]],
                        attempts: int = 50) -> tuple[M, T]:
    """Apply a pure transition to a KV record with compare-and-set; on a conflict re-read and apply
    it again, so two deployer replicas never lose an update."""
    for attempt in range(attempts):
        old, revision = await read_record(kv, key, model)
        new, out = change(old)
        if new == old:
            return new, out
        value = new.model_dump_json().encode()
        try:
            if revision:
                await kv.update(key, value, last=revision)
            else:
                await kv.create(key, value)
            return new, out
        except nats.js.errors.KeyWrongLastSequenceError:
            # Another replica wrote first; a short random pause keeps two from colliding again.
            await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))
    raise RuntimeError(f"{key}: record kept changing under {attempts} attempts to update it")


class CampaignStore:
    def __init__(self, kv: KeyValue, attempts: int = 50):
        self.kv = kv
        self.attempts = attempts

    @classmethod
    async def open(cls, broker: NatsBroker) -> "CampaignStore":
        return cls(await broker.key_value(subjects.CAMPAIGN_BUCKET, history=subjects.CAMPAIGN_HISTORY,
                                           replicas=replicas()))

    async def get(self, campaign_id: str) -> CampaignState | None:
        return (await read_record(self.kv, campaign_key(campaign_id), CampaignState))[0]

    async def update(self, campaign_id: str,
                     change: Callable[[CampaignState | None], tuple[CampaignState, T]]) -> tuple[CampaignState, T]:
        """Apply a pure transition with compare-and-set; on a conflict re-read and apply it again."""
        try:
            return await update_record(self.kv, campaign_key(campaign_id), CampaignState, change, self.attempts)
        except RuntimeError:
            raise RuntimeError(f"campaign {campaign_id}: state kept changing under {self.attempts} attempts "
                               "to update it") from None
