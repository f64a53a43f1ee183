"""The detector's FastStream shell: kernel.stats feed the change detector, and each change roots a
campaign's trace on usage.changed; the hypothesis stage turns usage.changed into a hypothesis.

The stats consumer keeps its state in memory: run one replica of it per stream (its durable is a
work queue, so two replicas would each see half the windows and misjudge every share)."""
import logging

from faststream import FastStream
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Status, StatusCode, TracerProvider
from pydantic import ValidationError

from detector.change import ChangeDetector
from detector.hypothesis import build_hypothesis, incumbent_from, peaks_for
from shared import subjects
from shared.broker import durable_subscriber, make_broker, publish, stream
from shared.schemas import Budget, Hypothesis, KernelKey, KernelStats, RegistryEntry, UsageChanged
from shared.settings import Settings

log = logging.getLogger("kernelloop.detector")

# Both handlers do milliseconds of work plus one publish or one KV read.
ACK_WAIT_S = 30.0


def build_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    broker, app = make_broker(settings.nats_url, tracer_provider)
    tracer = trace.get_tracer("kernelloop.detector", tracer_provider=tracer_provider)
    detector = ChangeDetector(min_time_share=settings.min_time_share, confirm_windows=settings.confirm_windows,
                              cooldown_s=settings.cooldown_s, slot_s=settings.window_s)
    budget = Budget(rounds=settings.rounds, variants_per_round=settings.variants_per_round)
    # Declared for the AsyncAPI document; messages go out through shared.broker.publish.
    broker.publisher(subjects.USAGE_CHANGED, stream=stream(), schema=UsageChanged, title="usage.changed",
                     description="a kernel key whose usage changed, with evidence")
    broker.publisher(subjects.HYPOTHESIS, stream=stream(), schema=Hypothesis, title="hypothesis",
                     description="a campaign: key, workload profile, incumbent, headroom, budget")

    async def read_registry(key: KernelKey) -> RegistryEntry | None:
        kv = await broker.key_value(subjects.REGISTRY_BUCKET, history=subjects.REGISTRY_HISTORY)
        try:
            entry = await kv.get(str(key))
        except (KeyNotFoundError, KeyDeletedError):  # never deployed, or deleted since
            return None
        try:
            return RegistryEntry.model_validate_json(entry.value)
        except ValidationError as e:
            log.error("registry entry %s is not a RegistryEntry (%s); treating the key as unserved", key, e)
            return None

    @durable_subscriber(broker, subjects.KERNEL_STATS, ack_wait_s=ACK_WAIT_S)
    async def on_kernel_stats(stats: KernelStats) -> None:
        for change in detector.observe(stats):
            # A campaign is one trace rooted where the change was detected; the window that
            # tipped it stays reachable through a link.
            window = trace.get_current_span().get_span_context()
            links = [Link(window)] if window.is_valid else []
            with tracer.start_as_current_span("detect", context=otel_context.Context(), links=links) as span:
                span.set_attributes({"op": change.key.op, "kernel_key": str(change.key), "reason": change.reason,
                                     "time_share": change.after.time_share if change.after else 0.0})
                await publish(broker, subjects.USAGE_CHANGED, change)
            log.info("usage changed for %s (%s): %s", change.key, change.reason, change.detail)

    @durable_subscriber(broker, subjects.USAGE_CHANGED, ack_wait_s=ACK_WAIT_S)
    async def on_usage_changed(event: UsageChanged) -> None:
        key = event.key
        with tracer.start_as_current_span("hypothesise") as span:
            span.set_attributes({"op": key.op, "kernel_key": str(key), "reason": event.reason})
            entry = await read_registry(key)
            try:
                hypothesis = build_hypothesis(event, detector.profile(key), incumbent_from(entry), budget,
                                              detector.time_us_per_call(key), peaks_for(key.hardware),
                                              time_share=getattr(detector.snapshot(key), "time_share", None))
            except ValueError as e:
                # a bad-but-valid event: say which field, ack it, keep serving
                log.error("usage.changed %s refused: %s", event.event_id, e)
                span.set_attribute("status", "rejected")
                span.set_status(Status(StatusCode.ERROR, str(e)))
                return
            span.set_attributes({"campaign_id": hypothesis.campaign.campaign_id, "status": "ok"})
            if entry is not None:
                span.set_attribute("variant_id", entry.variant_id)  # the incumbent
            await publish(broker, subjects.HYPOTHESIS, hypothesis)
            log.info("campaign %s for %s: %s", hypothesis.campaign.campaign_id, key, hypothesis.detail)

    return app
