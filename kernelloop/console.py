"""What every `kernelloop` command shares: the two ways a command fails, messages on stderr, JSON
output, a NATS connection that fails with one clear line, and publishing as the root of a trace."""
import asyncio
import getpass
import json
import os
import sys
from contextlib import asynccontextmanager

from shared.schemas import Event
from shared.settings import Settings, nats_servers


class Failed(Exception):
    """The command could not do its work; exit 1 with this message."""


class BadInput(Exception):
    """The user asked for something that cannot be; exit 2 with this message."""


def fail(message: str, code: int = 2) -> int:
    print(f"kernelloop: {message}", file=sys.stderr)
    return code


def progress(message: str) -> None:
    print(f"kernelloop: {message}", file=sys.stderr, flush=True)


def print_json(value) -> None:
    print(json.dumps(value, indent=2, default=str))


@asynccontextmanager
async def connected(nats_url: str):
    import nats

    async def quiet(_):  # the client would log a traceback per failed attempt; we say it once, below
        pass

    try:
        nc = await nats.connect(nats_servers(nats_url), connect_timeout=5, max_reconnect_attempts=1,
                                allow_reconnect=False, error_cb=quiet)
    except Exception as e:
        raise Failed(f"could not connect to NATS at {nats_url}: {e or type(e).__name__}") from None
    try:
        yield nc
    finally:
        await nc.close()


def run(coro) -> int:
    try:
        return asyncio.run(coro)
    except Failed as e:
        return fail(str(e), 1)
    except BadInput as e:
        return fail(str(e), 2)


def who(args) -> str:
    return args.by or os.environ.get("KERNELLOOP_USER") or getpass.getuser()


async def publish(nats_url: str, subject: str, event: Event, headers: dict[str, str]) -> int:
    async with connected(nats_url) as nc:
        try:
            ack = await nc.jetstream().publish(subject, event.model_dump_json().encode(), headers=headers, timeout=5)
        except Exception as e:
            hint = " (is the loop up? `kernelloop up` declares the stream)" if "no response" in str(e).lower() else ""
            raise Failed(f"could not publish to {nats_url}: {e or type(e).__name__}{hint}") from None
        return ack.seq


def publish_traced(settings: Settings, subject: str, event: Event, span_name: str | None = None,
                   attributes: dict | None = None) -> tuple[int, str]:
    """Publish from the command line as the root of a trace; returns (stream seq, trace id)."""
    from opentelemetry import propagate, trace

    from shared.telemetry import setup_tracing

    provider = setup_tracing("kernelloop-cli", settings.traces_dir, settings.otel_exporter_otlp_endpoint)
    try:
        tracer = trace.get_tracer("kernelloop.cli", tracer_provider=provider)
        with tracer.start_as_current_span(span_name or f"publish {subject}") as span:
            span.set_attributes({"event_id": event.event_id, "subject": subject, **(attributes or {})})
            headers = {"Nats-Msg-Id": event.event_id}
            propagate.inject(headers)
            seq = asyncio.run(publish(settings.nats_url, subject, event, headers))
            return seq, f"{span.get_span_context().trace_id:032x}"
    finally:
        provider.shutdown()


