"""The observer service's FastStream shell: profiler traces become kernel.stats, one event per
(op, dtype, bucket) the trace shows, for models that do not call kernelloop's ops. Traces come
inline on profiler.trace, from the object-store inbox and from a dropped-files folder
(shared/tracefiles.py); what each trace gave, its unmapped hot ops included, goes to the
trace summary bucket. A bad trace is refused with its reason and never stops the service."""
import asyncio
import hashlib
import io
import logging

import nats.js.errors
from faststream import FastStream
from opentelemetry.trace import TracerProvider

from observer.ingest.stats import ingest_profiler_trace, summarise
from shared import subjects
from shared.broker import durable_subscriber, make_broker, publish, replicas, stream
from shared.schemas import ProfilerTrace, TraceSummary
from shared.settings import Settings
from shared.tracefiles import (HARDWARE_HEADER, SOURCE_HEADER, TraceError, pending_files, read_trace, settle,
                               summary_key)

log = logging.getLogger("kernelloop.observer")


def stats_event_id(trace_event_id: str, key: str) -> str:
    """Deterministic, so a redelivered trace publishes nothing new (JetStream de-duplicates)."""
    return "trace-" + hashlib.sha256(f"{trace_event_id}/{key}".encode()).hexdigest()[:32]


def _header(headers: dict | None, name: str) -> str | None:
    value = (headers or {}).get(name)
    return (value[0] if value else None) if isinstance(value, list) else value


def build_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    broker, app = make_broker(settings.nats_url, tracer_provider)
    broker.publisher(subjects.KERNEL_STATS, stream=stream())  # declared for the AsyncAPI document
    max_bytes = int(settings.trace_max_mb * 2**20)

    async def take(trace_id: str, trace: dict, hardware: str, source: str) -> TraceSummary:
        """Ingest off the event loop (a large trace parses for seconds), publish, keep the summary."""
        try:
            result = await asyncio.to_thread(ingest_profiler_trace, trace, hardware, source)
        except ValueError as e:  # a trace without events: say why and go on
            return await keep(summarise(None, trace_id, hardware, source, error=str(e)))
        except Exception as e:  # a trace no rule foresaw: refused, so a file or event is not retried forever
            log.exception("trace %s from %s could not be ingested", trace_id, source)
            return await keep(summarise(None, trace_id, hardware, source, error=f"ingest failed: {e!r}"[:500]))
        for s in result.stats:
            s.event_id = stats_event_id(trace_id, str(s.key))
            await publish(broker, subjects.KERNEL_STATS, s)
        summary = await keep(summarise(result, trace_id, hardware, source))
        log.info("trace %s from %s: %d kernel.stats, %d unmapped hot ops, %d skipped", trace_id, source,
                 len(result.stats), len(result.unmapped), len(result.skipped))
        return summary

    async def keep(summary: TraceSummary) -> TraceSummary:
        if summary.status == "rejected":
            log.error("trace %s from %s refused: %s", summary.trace_id, summary.source, summary.error)
        kv = await broker.key_value(subjects.TRACE_SUMMARY_BUCKET, history=subjects.TRACE_SUMMARY_HISTORY,
                                    replicas=replicas())
        await kv.put(summary_key(summary.hardware, summary.source), summary.model_dump_json().encode())
        return summary

    # A large trace takes seconds to parse; a minute of ack_wait leaves room to publish after it.
    @durable_subscriber(broker, subjects.PROFILER_TRACE, ack_wait_s=60.0)
    async def on_profiler_trace(event: ProfilerTrace) -> None:
        await take(event.event_id, event.trace, event.hardware, event.source)

    async def take_bytes(data: bytes, name: str, hardware: str | None = None, source: str | None = None) -> str | None:
        """A file's or object's bytes; returns why they were refused, or None."""
        try:
            trace_id, hardware, source, trace = await asyncio.to_thread(read_trace, data, name, max_bytes,
                                                                        hardware, source)
        except TraceError as e:
            await keep(summarise(None, name, hardware or "unknown", source or f"file:{name}"[:256], error=str(e)))
            return str(e)
        summary = await take(trace_id, trace, hardware, source)
        return summary.error

    async def poll_folder() -> None:
        for path in pending_files(settings.trace_dir, settle_s=settings.trace_poll_s):
            size = path.stat().st_size
            if size > max_bytes:  # not read at all
                error = f"trace is {size / 2**20:.1f} MiB, over the {settings.trace_max_mb:.0f} MiB limit " \
                        "(KERNELLOOP_TRACE_MAX_MB)"
                await keep(summarise(None, path.name, "unknown", f"file:{path.name}", error=error))
            else:
                error = await take_bytes(await asyncio.to_thread(path.read_bytes), path.name)
            settle(path, error)

    async def poll_objects() -> None:
        js = broker.connection.jetstream()
        try:
            store = await js.object_store(subjects.TRACE_OBJECT_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            store = await js.create_object_store(subjects.TRACE_OBJECT_BUCKET, replicas=replicas())
        try:
            infos = await store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return  # the inbox is empty
        for info in infos:
            hardware, source = _header(info.headers, HARDWARE_HEADER), _header(info.headers, SOURCE_HEADER)
            if (info.size or 0) > max_bytes:
                error = f"trace is {info.size / 2**20:.1f} MiB, over the {settings.trace_max_mb:.0f} MiB limit"
                await keep(summarise(None, info.name, hardware or "unknown", source or f"object:{info.name}",
                                     error=error))
            else:
                buffer = io.BytesIO()
                await store.get(info.name, writeinto=buffer)
                await take_bytes(buffer.getvalue(), info.name, hardware, source)
            await store.delete(info.name)  # ingested or refused, with its summary kept: the inbox is emptied

    async def poll_inboxes() -> None:
        while True:
            for poll in ([poll_folder] if settings.trace_dir else []) + [poll_objects]:
                try:
                    await poll()
                except Exception:  # NATS down, a file gone meanwhile: try again next time
                    log.exception("trace inbox %s failed; trying again in %.0f s", poll.__name__, settings.trace_poll_s)
            await asyncio.sleep(settings.trace_poll_s)

    polling: list[asyncio.Task] = []

    @app.after_startup
    async def _start_polling() -> None:
        polling.append(asyncio.create_task(poll_inboxes()))

    @app.on_shutdown
    async def _stop_polling() -> None:
        for task in polling:
            task.cancel()

    return app
