"""The detector's FastStream shell: kernel.stats feed the change detector, and each change roots a
campaign's trace on usage.changed; the hypothesis stage turns usage.changed into a hypothesis when
the expected gain is worth it and no campaign for the key is in flight.

The stats consumer keeps its state in memory and rebuilds it from the stream when it starts
(detector/replay.py): run one replica of it per stream (its durable is a work queue, so two replicas
would each see half the windows and misjudge every share)."""
import logging

from faststream import Context, FastStream
from faststream.nats.message import NatsBatchMessage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Status, StatusCode, TracerProvider

from detector.change import ChangeDetector
from detector.hypothesis import build_hypothesis, incumbent_from, worth_a_campaign
from detector.inflight import CampaignGuard
from detector.lookups import Lookups, learn_promise
from detector.ranking import by_expected_gain
from detector.replay import Restorer, replay
from shared import deadletters, subjects
from shared.broker import batch_subscriber, durable_subscriber, handle_each, make_broker, publish, stream
from shared.schemas import Budget, Hypothesis, KernelStats, UsageChanged
from shared.settings import Settings

log = logging.getLogger("kernelloop.detector")

# Both handlers do milliseconds of work plus one publish or a few KV reads; the first window after
# a start also waits for the replay of the stream's recent windows.
ACK_WAIT_S = 60.0


def build_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    broker, app = make_broker(settings.nats_url, tracer_provider)
    tracer = trace.get_tracer("kernelloop.detector", tracer_provider=tracer_provider)
    detector = ChangeDetector(min_time_share=settings.min_time_share, confirm_windows=settings.confirm_windows,
                              cooldown_s=settings.cooldown_s, slot_s=settings.window_s)
    budget = Budget(rounds=settings.rounds, variants_per_round=settings.variants_per_round)
    lookups = Lookups(broker)  # the registry, the measured peaks, the campaign guard's buckets
    restorer = Restorer(lambda since, before: replay(broker.connection.jetstream(), detector, since, before),
                        settings.detector_replay_s)
    # Declared for the AsyncAPI document; messages go out through shared.broker.publish.
    broker.publisher(subjects.USAGE_CHANGED, stream=stream(), schema=UsageChanged, title="usage.changed",
                     description="a kernel key whose usage changed, with evidence")
    broker.publisher(subjects.HYPOTHESIS, stream=stream(), schema=Hypothesis, title="hypothesis",
                     description="a campaign: key, workload profile, incumbent, headroom, budget")

    # A fleet sends hundreds of windows a second: they come in batches, judged one by one in stream
    # order (windows judged out of order would be counted as late).
    @batch_subscriber(broker, subjects.KERNEL_STATS, ack_wait_s=ACK_WAIT_S)
    async def on_kernel_stats(body: list[bytes], msg: NatsBatchMessage = Context("message")) -> None:
        if not msg.raw_message:
            return
        await restorer.restore(msg.raw_message[0])
        await handle_each(broker, KernelStats, msg.raw_message, on_window)

    async def on_window(stats: KernelStats, raw) -> None:
        if restorer.replayed(raw):
            return  # the restore counted it already
        await learn_promise(detector, stats, lookups.registry)
        for change in await by_expected_gain(detector.observe(stats), detector, budget, lookups.registry,
                                             lookups.peaks):
            # A campaign is one trace rooted where the change was detected; the window that tipped
            # it stays reachable through links: to the trace it was published in, if any, and to
            # the span of the batch that brought it.
            published = trace.get_current_span(propagate.extract(raw.headers or {})).get_span_context()
            batch = trace.get_current_span().get_span_context()
            links = [Link(c, {"link": name}) for c, name in ((published, "published"), (batch, "consumed"))
                     if c.is_valid]
            with tracer.start_as_current_span("detect", context=otel_context.Context(), links=links) as span:
                span.set_attributes({"op": change.key.op, "kernel_key": str(change.key), "bucket": change.key.bucket,
                                     "reason": change.reason, "window_seq": raw.metadata.sequence.stream,
                                     "time_share": change.after.time_share if change.after else 0.0})
                await publish(broker, subjects.USAGE_CHANGED, change)
            log.info("usage changed for %s (%s): %s", change.key, change.reason, change.detail)

    @durable_subscriber(broker, subjects.USAGE_CHANGED, ack_wait_s=ACK_WAIT_S)
    async def on_usage_changed(event: UsageChanged) -> None:
        await restorer.restore()
        key = event.key
        with tracer.start_as_current_span("hypothesise") as span:
            span.set_attributes({"op": key.op, "kernel_key": str(key), "bucket": key.bucket, "reason": event.reason})
            if event.reason == "regression" and event.after_deploy:
                log.info("regression of %s after the deploy of %s: the deployer rolls it back, no campaign",
                         key, event.variant_id)
                span.set_attribute("status", "rollback")
                return
            entry = await lookups.registry(key)
            try:
                hypothesis = build_hypothesis(event, detector.profile(key), incumbent_from(entry), budget,
                                              detector.time_us_per_call(key), await lookups.peaks(key.hardware),
                                              time_share=getattr(detector.snapshot(key), "time_share", None))
            except ValueError as e:
                # a bad-but-valid event: say which field, dead-letter it (which acks it), keep serving
                log.error("usage.changed %s refused: %s", event.event_id, e)
                span.set_attribute("status", "rejected")
                span.set_status(Status(StatusCode.ERROR, str(e)))
                raise deadletters.Refused(str(e)) from None
            span.set_attribute("expected_gain", hypothesis.expected_gain)
            worth, why = worth_a_campaign(hypothesis, settings.min_expected_gain)
            if not worth:
                log.info("no campaign for %s: %s", key, why)
                span.set_attribute("status", "below_min_gain")
                return
            guard = CampaignGuard(await lookups.bucket(subjects.DETECTOR_BUCKET, subjects.DETECTOR_HISTORY),
                                  await lookups.bucket(subjects.CAMPAIGN_BUCKET, subjects.CAMPAIGN_HISTORY),
                                  settings.campaign_timeout_s)
            claim = await guard.claim(str(key), hypothesis.campaign.campaign_id, event.event_id,
                                      force=event.reason == "manual")
            if not claim.granted:
                log.info("no campaign for %s: %s", key, claim.reason)
                span.set_attribute("status", "in_flight")
                return
            span.set_attributes({"campaign_id": hypothesis.campaign.campaign_id, "status": "ok"})
            if entry is not None:
                span.set_attribute("variant_id", entry.variant_id)  # the incumbent
            await publish(broker, subjects.HYPOTHESIS, hypothesis)
            log.info("campaign %s for %s (%s): %s", hypothesis.campaign.campaign_id, key, why, hypothesis.detail)

    return app
