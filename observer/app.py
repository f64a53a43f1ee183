"""The observer service's FastStream shell: each profiler.trace becomes kernel.stats, one event per
(op, dtype, bucket) the trace shows, for models that do not call kernelloop's ops."""
import hashlib
import logging

from faststream import FastStream
from opentelemetry.trace import TracerProvider

from observer.ingest import stats_from_profiler_trace
from shared import subjects
from shared.broker import durable_subscriber, make_broker, publish, stream
from shared.schemas import ProfilerTrace
from shared.settings import Settings

log = logging.getLogger("kernelloop.observer")


def stats_event_id(trace_event_id: str, key: str) -> str:
    """Deterministic, so a redelivered trace publishes nothing new (JetStream de-duplicates)."""
    return "trace-" + hashlib.sha256(f"{trace_event_id}/{key}".encode()).hexdigest()[:32]


def build_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    broker, app = make_broker(settings.nats_url, tracer_provider)
    broker.publisher(subjects.KERNEL_STATS, stream=stream())  # declared for the AsyncAPI document

    # A large trace takes seconds to parse; a minute of ack_wait leaves room to publish after it.
    @durable_subscriber(broker, subjects.PROFILER_TRACE, ack_wait_s=60.0)
    async def on_profiler_trace(event: ProfilerTrace) -> None:
        try:
            stats = stats_from_profiler_trace(event.trace, event.hardware, event.source)
        except ValueError as e:  # a valid event with an unusable trace: say why, ack, go on
            log.error("profiler.trace %s from %s refused: %s", event.event_id, event.source, e)
            return
        if not stats:
            log.info("profiler.trace %s from %s: no calls of catalog ops", event.event_id, event.source)
        for s in stats:
            s.event_id = stats_event_id(event.event_id, str(s.key))
            await publish(broker, subjects.KERNEL_STATS, s)
        log.info("profiler.trace %s from %s: %d kernel.stats published", event.event_id, event.source, len(stats))

    return app
