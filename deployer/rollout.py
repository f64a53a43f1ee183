"""Carrying out what a closed round decided: publish the refine, or write the registry and publish
the deploy; and approve(), which does the deploy a person held back. Every step is idempotent (fixed
event ids, a registry entry recognised as already written), so a redelivered result or a second
replica finishing the same step changes nothing.

With canaries on (a CanaryConfig), a deploy claims its hardware's canary record first and writes the
winner as a canary entry; while another key's canary holds the hardware the deploy waits, its
campaign left pending "deploy" for deployer/canary_run.py to carry out when that canary is done."""
import logging
from datetime import datetime, timezone

from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.trace import Tracer

from deployer.campaign import (AUTO_GATE, CampaignStore, grant_approval, mark_abandoned, mark_announced, mark_deployed,
                               mark_refined, refine_event, reject_deploy)
from deployer.canary_state import CanaryConfig, CanaryStore, claim, release, written
from shared import subjects
from shared.broker import publish
from shared.registry import Registry, StaleRevision
from shared.schemas import CampaignState, Deploy, DeployApproval, DeployPending, Refine, RegistryEntry

log = logging.getLogger("kernelloop.deployer")


class IncumbentChanged(Exception):
    """The key is served by something other than what the winner was measured against."""


class Waiting(Exception):
    """Another key's canary holds the hardware: this deploy waits its turn."""


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def _tracer(tracer: Tracer | None) -> Tracer:
    return tracer or trace.get_tracer("kernelloop.deployer")


async def deploy(broker: NatsBroker, registry: Registry, state: CampaignState, trace_id: str | None,
                 tracer: Tracer | None = None, attempts: int = 5, canary: CanaryConfig | None = None) -> Deploy:
    """Write the round's winner to the registry (as a canary when canary is given) and publish
    `deploy`. Raises Waiting while another key's canary holds the hardware."""
    campaign, winner = state.campaign, state.winner
    attributes = {"campaign_id": campaign.campaign_id, "kernel_key": str(campaign.key), "op": campaign.key.op,
                  "bucket": campaign.key.bucket, "variant_id": winner.variant_id, "strategy": winner.strategy,
                  "speedup": winner.weighted_speedup, "approved_by": state.approved_by or "",
                  "stage": "canary" if canary else "promoted"}
    canaries = await CanaryStore.open(broker) if canary else None
    hardware, campaign_id = campaign.key.hardware, campaign.campaign_id
    with _tracer(tracer).start_as_current_span("deploy", attributes=attributes) as span:
        trace_id = trace_id or current_trace_id()
        span_id = f"{span.get_span_context().span_id:016x}" if span.get_span_context().is_valid else None
        for _ in range(attempts):
            current = await registry.read(campaign.key)
            ours = current and current.entry.campaign_id == campaign.campaign_id
            if ours and current.entry.variant_id == winner.variant_id:
                # An earlier attempt wrote it and then failed before the event went out.
                revision, previous, stage = current.revision, current.entry.previous_variant_id, current.entry.stage
                break
            serving = current.entry.variant_id if current else None
            if serving != campaign.incumbent.variant_id:
                raise IncumbentChanged(
                    f"campaign {campaign.campaign_id}: {winner.variant_id} was measured against "
                    f"{campaign.incumbent.variant_id or 'the fallback'}, but {serving or 'the fallback'} serves "
                    f"{campaign.key} now; not deploying a speedup over something no longer served")
            if canaries is not None:
                now = datetime.now(timezone.utc)
                run, claimed = await canaries.update(hardware, lambda r: claim(
                    r, campaign_id, campaign.key, winner.variant_id, serving, winner.weighted_speedup,
                    winner.speedup_ci_low, now))
                if claimed == "same_key":
                    raise IncumbentChanged(
                        f"campaign {campaign_id}: {winner.variant_id} was measured against {serving or 'the fallback'}, "
                        f"but {run.variant_id} is in its canary on {campaign.key} now (campaign {run.campaign_id})")
                if claimed == "wait":
                    raise Waiting(f"waits for the canary of {run.variant_id} on {run.key} (campaign {run.campaign_id})")
            stage = "canary" if canaries is not None else "promoted"
            entry = RegistryEntry(variant_id=winner.variant_id, source=winner.source, params=winner.params,
                                  speedup=winner.weighted_speedup, campaign_id=campaign.campaign_id,
                                  approved_by=state.approved_by, previous_variant_id=serving, trace_id=trace_id,
                                  stage=stage)
            try:
                revision = await registry.write(campaign.key, entry, current.revision if current else None)
                previous = serving
                break
            except StaleRevision:
                continue  # re-read: either our own entry (a twin replica) or a different incumbent
        else:
            raise StaleRevision(f"registry key {campaign.key} kept changing under {attempts} deploy attempts")
        if canaries is not None and stage == "canary":
            now = datetime.now(timezone.utc)
            await canaries.update(hardware, lambda r: written(r, campaign_id, revision, trace_id, span_id, now))
        event = Deploy(event_id=f"deploy-{campaign.campaign_id}", campaign_id=campaign.campaign_id, key=campaign.key,
                       variant_id=winner.variant_id, previous_variant_id=previous, speedup=winner.weighted_speedup,
                       speedup_ci_low=winner.speedup_ci_low, revision=revision, approved_by=state.approved_by,
                       trace_id=trace_id, stage=stage)
        await publish(broker, subjects.DEPLOY, event)
    log.info("deployed %s for %s at revision %d (%s, %s)", winner.variant_id, campaign.key, revision,
             state.approved_by, stage)
    return event


async def carry_out(broker: NatsBroker, store: CampaignStore, registry: Registry, state: CampaignState,
                    trace_id: str | None = None, tracer: Tracer | None = None,
                    canary: CanaryConfig | None = None) -> Refine | Deploy | None:
    """Do what the state still owes (a refine, a deploy, or the notice of one awaiting approval),
    then record that it is done. A deploy waiting for its hardware's canary stays owed."""
    campaign_id = state.campaign.campaign_id
    if state.status == "awaiting_approval" and not state.announced:
        event = pending_event(state)
        await publish(broker, subjects.DEPLOY_PENDING, event)
        await store.update(campaign_id, lambda s: (mark_announced(s), None))
        log.warning("campaign %s: %s awaits approval on %s", campaign_id, event.variant_id, subjects.DEPLOY_APPROVAL)
        return None
    if state.pending == "refine":
        event = refine_event(state)
        await publish(broker, subjects.REFINE, event)
        await store.update(campaign_id, lambda s: (mark_refined(s, event.round), None))
        log.info("campaign %s: refine for round %d (%d rounds left)", campaign_id, event.round, event.rounds_left)
        return event
    if state.pending == "deploy":
        try:
            event = await deploy(broker, registry, state, trace_id, tracer, canary=canary)
        except IncumbentChanged as e:
            log.error("%s", e)
            if canary is not None:
                now = datetime.now(timezone.utc)
                await (await CanaryStore.open(broker)).update(
                    state.campaign.key.hardware, lambda r: release(r, campaign_id, str(e), now))
            await store.update(campaign_id, lambda s: (mark_abandoned(s, str(e)), None))
            return None
        except Waiting as e:
            log.info("campaign %s: the deploy of %s %s", campaign_id, state.winner.variant_id, e)
            await store.update(campaign_id, lambda s: (note_waiting(s, str(e)), None))
            return None
        await store.update(campaign_id, lambda s: (mark_deployed(s, event.revision), None))
        return event
    return None


def note_waiting(state: CampaignState, why: str) -> CampaignState:
    """The deploy is still owed; the reason says what it waits for."""
    if state.pending != "deploy" or state.reason == why:
        return state
    state = state.model_copy(deep=True)
    state.reason = why
    return state


async def approve(broker: NatsBroker, campaign_id: str, who: str, tracer: Tracer | None = None,
                  canary: CanaryConfig | None = None) -> Deploy | None:
    """Deploy the winner of a campaign that waits for a person's approval. `broker` must be connected.
    None: approved, and the deploy waits for its hardware's canary (it follows when that is done)."""
    if not who or who == AUTO_GATE:
        raise ValueError("approval needs the name of the person who approves")
    store, registry = await CampaignStore.open(broker), await Registry.open(broker)

    def _grant(state: CampaignState | None) -> tuple[CampaignState, None]:
        if state is None:
            raise LookupError(f"no campaign {campaign_id} in {subjects.CAMPAIGN_BUCKET}")
        if state.pending == "deploy" and state.approved_by == who:
            return state, None  # the same approval, retried after it was cut short: finish it
        return grant_approval(state, who), None

    state, _ = await store.update(campaign_id, _grant)
    # The campaign's own trace, so `kernelloop trace` shows the approval's deploy with its rounds.
    event = await carry_out(broker, store, registry, state, state.trace_id, tracer, canary)
    if not isinstance(event, Deploy):
        state = await store.get(campaign_id)
        if state.pending == "deploy":
            return None  # waits its turn
        raise RuntimeError(f"campaign {campaign_id}: approved, but not deployed: {state.reason}")
    return event


def pending_event(state: CampaignState) -> DeployPending:
    """The notice of a held winner; its id is fixed per campaign so a retry is de-duplicated."""
    campaign, winner = state.campaign, state.winner
    policy = state.reason.split("; held: ", 1)[-1] if "; held: " in state.reason else "approval required"
    return DeployPending(event_id=f"pending-{campaign.campaign_id}", campaign_id=campaign.campaign_id, key=campaign.key,
                         variant_id=winner.variant_id, previous_variant_id=campaign.incumbent.variant_id,
                         speedup=winner.weighted_speedup, speedup_ci_low=winner.speedup_ci_low,
                         time_share=campaign.time_share, policy=policy, trace_id=state.trace_id)


async def reject(broker: NatsBroker, campaign_id: str, who: str, reason: str = "") -> CampaignState:
    """Refuse the winner of a campaign that waits for approval; nothing is deployed."""
    if not who or who == AUTO_GATE:
        raise ValueError("a rejection needs the name of the person who rejects")
    store = await CampaignStore.open(broker)

    def _reject(state: CampaignState | None) -> tuple[CampaignState, None]:
        if state is None:
            raise LookupError(f"no campaign {campaign_id} in {subjects.CAMPAIGN_BUCKET}")
        if state.status == "rejected" and state.rejected_by == who:
            return state, None  # the same rejection, redelivered
        return reject_deploy(state, who, reason), None

    state, _ = await store.update(campaign_id, _reject)
    log.info("campaign %s: %s", campaign_id, state.reason)
    return state


def span_context(trace_id: str | None, span_id: str | None) -> trace.Context | None:
    """A context whose parent is the span trace_id/span_id names, so a later decision joins its trace."""
    if not trace_id or not span_id:
        return None
    parent = trace.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                               trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def _campaign_context(state: CampaignState | None) -> trace.Context | None:
    """The context of the span that held the campaign's winner, so a decision joins its trace."""
    return span_context(state.trace_id, state.span_id) if state is not None else None


async def decide_approval(broker: NatsBroker, approval: DeployApproval, tracer: Tracer | None = None,
                          canary: CanaryConfig | None = None) -> Deploy | None:
    """A person's approve or reject, from any client: recorded on the campaign's trace with who made
    it (the approval's own trace is linked). Returns the deploy an approval made."""
    state = await (await CampaignStore.open(broker)).get(approval.campaign_id)
    here = trace.get_current_span().get_span_context()
    links = [trace.Link(here)] if here.is_valid else []
    attributes = {"campaign_id": approval.campaign_id, "decision": approval.decision, "decided_by": approval.by,
                  "reason": approval.reason}
    if state is not None:
        key = state.campaign.key
        attributes.update(kernel_key=str(key), op=key.op, bucket=key.bucket)
        if state.winner is not None:
            attributes.update(variant_id=state.winner.variant_id, speedup=state.winner.weighted_speedup or 0.0)
    with _tracer(tracer).start_as_current_span(approval.decision, context=_campaign_context(state), links=links,
                                               attributes=attributes) as span:
        try:
            if approval.decision == "reject":
                await reject(broker, approval.campaign_id, approval.by, approval.reason)
                return None
            event = await approve(broker, approval.campaign_id, approval.by, tracer, canary)
        except (LookupError, ValueError, RuntimeError) as e:
            # A decision on a campaign that is not waiting cannot succeed on redelivery: say so, ack.
            span.record_exception(e)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(e)))
            log.error("%s of campaign %s by %s refused: %s", approval.decision, approval.campaign_id, approval.by, e)
            return None
        if event is None:
            span.set_attribute("waits", "for its hardware's canary")
            return None
        span.set_attribute("revision", event.revision)
        return event
