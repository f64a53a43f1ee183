"""The deployer's FastStream shell: on each bench.result, record it in the campaign's round state;
when it completes a round, the gate decides, and the deployer deploys, asks for a refine, or stops."""
import asyncio
import logging

from faststream import FastStream
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from deployer import canary_run, regression
from deployer.campaign import AUTO_GATE, CampaignStore, approval_needed, record
from deployer.canary_state import CanaryConfig
from deployer.queue import watch_benchmark_queue
from deployer.rollout import carry_out, current_trace_id, decide_approval
from shared import subjects
from shared.broker import durable_subscriber, make_broker, stream
from shared.registry import Registry, withdrawn
from shared.schemas import BenchResult, Deploy, DeployApproval
from shared.settings import Settings
from shared.telemetry import LoopMetrics

log = logging.getLogger("kernelloop.deployer")


def build_app(settings: Settings, tracer_provider: TracerProvider | None = None, meter_provider=None) -> FastStream:
    broker, app = make_broker(settings.nats_url, tracer_provider)
    tracer = trace.get_tracer("kernelloop.deployer", tracer_provider=tracer_provider)
    metrics = LoopMetrics(meter_provider)
    margin = settings.min_speedup_margin
    policy = "manual" if settings.require_approval else settings.deploy_policy
    # Declared so they appear in the AsyncAPI document; events go out through shared.broker.publish.
    broker.publisher(subjects.DEPLOY, stream=stream())
    broker.publisher(subjects.REFINE, stream=stream())
    broker.publisher(subjects.DEPLOY_PENDING, stream=stream())
    regression.register(broker, tracer)  # a live regression after a deploy is rolled back
    # Canaries already running are decided even with new ones off; `canary` is what deploys start as.
    canaries = CanaryConfig(max_s=settings.canary_max_s)
    canary = canaries if settings.canary else None
    canary_run.register(broker, canaries, tracer)

    @durable_subscriber(broker, subjects.BENCH_RESULT, ack_wait_s=60.0)
    async def on_bench_result(result: BenchResult) -> None:
        campaign = result.campaign
        store, registry = await CampaignStore.open(broker), await Registry.open(broker)
        attributes = {"campaign_id": campaign.campaign_id, "kernel_key": str(campaign.key), "op": campaign.key.op,
                      "bucket": campaign.key.bucket, "variant_id": result.variant_id, "strategy": result.strategy,
                      "round": result.round, "status": result.status}
        if result.weighted_speedup is not None:
            attributes["speedup"] = result.weighted_speedup
        held = approval_needed(policy, settings.approval_share, campaign.time_share)
        with tracer.start_as_current_span("decide", attributes=attributes) as span:
            trace_id, span_id = current_trace_id(), f"{span.get_span_context().span_id:016x}"

            started = []
            taken_off = withdrawn(await registry.history(campaign.key))

            def _record(s):
                started[:] = [s is None]
                state, step = record(s, result, margin, bool(held), trace_id, span_id, taken_off)
                if step.decision is not None and state.status == "awaiting_approval":
                    state.reason = f"{state.reason}; held: {held}"
                return state, step

            state, step = await store.update(campaign.campaign_id, _record)
            span.set_attribute("campaign_status", state.status)
            if step.decision is not None:
                span.set_attribute("decision", "deploy" if step.decision.deploy else "no deploy")
                span.set_attribute("reason", step.decision.reason)
                # Who decided: the gate; a held winner waits for a person, whose decision is its own span.
                span.set_attribute("decided_by", AUTO_GATE)
                if state.status == "awaiting_approval":
                    span.set_attribute("held", held)
                here = span.get_span_context()
                for other in step.fan_in:  # the round's decision fans in from every result
                    span.add_link(trace.SpanContext(here.trace_id, int(other, 16), is_remote=True,
                                                    trace_flags=here.trace_flags))
        log.info("campaign %s: %s", campaign.campaign_id, step.note)
        if step.changed:
            op = {"op": campaign.key.op}
            metrics.variants.add(1, {**op, "status": result.status, "strategy": result.strategy})
            if started[0]:
                metrics.campaigns.add(1, {**op, "event": "started"})
            if step.decision is not None and state.status in ("exhausted", "awaiting_approval"):
                waits = state.status == "awaiting_approval"
                metrics.campaigns.add(1, {**op, "event": "held" if waits else "exhausted"})
        if state.status == "exhausted" and step.changed:
            log.warning("campaign %s exhausted, nothing deployed: %s", campaign.campaign_id, state.reason)
        if state.status == "awaiting_approval" and step.decision is not None:
            log.warning("campaign %s awaits approval: %s", campaign.campaign_id, state.reason)
        # Also after a duplicate: a step a crashed attempt left undone is finished here.
        count_deploy(metrics, await carry_out(broker, store, registry, state, trace_id, tracer, canary))

    @durable_subscriber(broker, subjects.DEPLOY_APPROVAL, ack_wait_s=60.0)
    async def on_deploy_approval(approval: DeployApproval) -> None:
        deploy = await decide_approval(broker, approval, tracer, canary)
        count_deploy(metrics, deploy)
        if approval.decision == "reject":
            metrics.campaigns.add(1, {"event": "rejected"})

    watching: list[asyncio.Task] = []

    @app.after_startup
    async def _watch_queue() -> None:
        watching.append(asyncio.create_task(watch_benchmark_queue(broker.connection.jetstream(), metrics)))
        watching.append(asyncio.create_task(canary_run.keep_sweeping(broker, canaries, tracer)))

    @app.on_shutdown
    async def _stop_watching() -> None:
        for task in watching:
            task.cancel()

    return app


def count_deploy(metrics: LoopMetrics, event) -> None:
    if isinstance(event, Deploy):  # counted when its canary starts (or, without canaries, when final)
        who = "gate" if event.approved_by == "auto-gate" else "person"
        metrics.deploys.add(1, {"op": event.key.op, "approved_by": who})
        metrics.campaigns.add(1, {"op": event.key.op, "event": "deployed"})
