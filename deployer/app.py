"""The deployer's FastStream shell: on each bench.result, record it in the campaign's round state;
when it completes a round, the gate decides, and the deployer deploys, asks for a refine, or stops."""
import logging

from faststream import FastStream
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from deployer.campaign import CampaignStore, record
from deployer.registry import Registry
from deployer.rollout import carry_out, current_trace_id
from shared import subjects
from shared.broker import durable_subscriber, make_broker, stream
from shared.schemas import BenchResult
from shared.settings import Settings

log = logging.getLogger("kernelloop.deployer")


def build_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    broker, app = make_broker(settings.nats_url, tracer_provider)
    tracer = trace.get_tracer("kernelloop.deployer", tracer_provider=tracer_provider)
    margin, require_approval = settings.min_speedup_margin, settings.require_approval
    # Declared so they appear in the AsyncAPI document; events go out through shared.broker.publish.
    broker.publisher(subjects.DEPLOY, stream=stream())
    broker.publisher(subjects.REFINE, stream=stream())

    @durable_subscriber(broker, subjects.BENCH_RESULT, ack_wait_s=60.0)
    async def on_bench_result(result: BenchResult) -> None:
        campaign = result.campaign
        store, registry = await CampaignStore.open(broker), await Registry.open(broker)
        attributes = {"campaign_id": campaign.campaign_id, "kernel_key": str(campaign.key), "op": campaign.key.op,
                      "variant_id": result.variant_id, "strategy": result.strategy}
        if result.weighted_speedup is not None:
            attributes["speedup"] = result.weighted_speedup
        with tracer.start_as_current_span("decide", attributes=attributes) as span:
            trace_id = current_trace_id()
            state, step = await store.update(
                campaign.campaign_id, lambda s: record(s, result, margin, require_approval, trace_id))
            span.set_attribute("status", state.status)
        log.info("campaign %s: %s", campaign.campaign_id, step.note)
        if state.status == "exhausted" and step.changed:
            log.warning("campaign %s exhausted, nothing deployed: %s", campaign.campaign_id, state.reason)
        if state.status == "awaiting_approval" and step.decision is not None:
            log.warning("campaign %s awaits approval: %s", campaign.campaign_id, state.reason)
        # Also after a duplicate: a step a crashed attempt left undone is finished here.
        await carry_out(broker, store, registry, state, trace_id, tracer)

    return app
