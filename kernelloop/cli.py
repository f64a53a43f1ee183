"""The `kernelloop` command: up, publish, schema, trace, status. Exit codes: 0 ok, 1 failed,
2 bad input (nothing was published)."""
import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from shared import subjects, traces
from shared.interpreter import use_interpreter_without_gpu
from shared.schemas import BY_SUBJECT, Event, RegistryEntry
from shared.settings import Settings


def _fail(message: str, code: int = 2) -> int:
    print(f"kernelloop: {message}", file=sys.stderr)
    return code


def cmd_schema(args, settings: Settings) -> int:
    if args.subject not in BY_SUBJECT:
        return _fail(f"unknown subject {args.subject!r}; subjects: {', '.join(BY_SUBJECT)}")
    print(json.dumps(BY_SUBJECT[args.subject].model_json_schema(), indent=2))
    return 0


def validate_event(subject: str, text: str) -> Event:
    """Parse a hand-written event; raises ValueError naming each bad field."""
    if subject not in BY_SUBJECT:
        raise ValueError(f"unknown subject {subject!r}; subjects: {', '.join(BY_SUBJECT)}")
    try:
        return BY_SUBJECT[subject].model_validate_json(text)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or '(event)'}: {err['msg']}" for err in e.errors()]
        raise ValueError(f"invalid {subject} event:\n  " + "\n  ".join(problems)) from None


async def _publish(nats_url: str, subject: str, event: Event, headers: dict[str, str]) -> int:
    import nats

    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=1)
    try:
        ack = await nc.jetstream().publish(subject, event.model_dump_json().encode(), headers=headers, timeout=5)
        return ack.seq
    finally:
        await nc.close()


def cmd_publish(args, settings: Settings) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    try:
        event = validate_event(args.subject, text)
    except ValueError as e:
        return _fail(str(e))
    from opentelemetry import propagate, trace

    from shared.telemetry import setup_tracing

    # A hand-published event roots its own trace, so the campaign it starts can be followed.
    provider = setup_tracing("kernelloop-cli", settings.traces_dir, settings.otel_exporter_otlp_endpoint)
    with trace.get_tracer("kernelloop.cli").start_as_current_span(f"publish {args.subject}") as span:
        span.set_attribute("event_id", event.event_id)
        headers = {"Nats-Msg-Id": event.event_id}
        propagate.inject(headers)
        trace_id = f"{span.get_span_context().trace_id:032x}"
        try:
            seq = asyncio.run(_publish(settings.nats_url, args.subject, event, headers))
        except Exception as e:  # no server, no stream: say so plainly
            hint = " (is the loop up? `kernelloop up` declares the stream)" if "no response from stream" in str(e) else ""
            return _fail(f"could not publish to {settings.nats_url}: {e}{hint}", 1)
    provider.shutdown()
    print(json.dumps({"subject": args.subject, "event_id": event.event_id, "stream_seq": seq, "trace_id": trace_id})
          if args.json else f"published {args.subject} event {event.event_id} (stream seq {seq}); trace {trace_id}")
    return 0


def cmd_trace(args, settings: Settings) -> int:
    spans = traces_from(settings)
    if not args.ident:
        found = traces.campaigns(spans)
        if args.json:
            print(json.dumps(found, indent=2))
        for cid, tid in found.items():
            print(f"campaign {cid}  trace {tid}  services: {', '.join(traces.services_in(spans, tid))}")
        return 0
    trace_id = traces.find_trace_id(spans, args.ident)
    if trace_id is None:
        return _fail(f"no trace or campaign {args.ident!r} in {settings.traces_dir}", 1)
    if args.json:
        print(json.dumps(traces.spans_of(spans, trace_id), indent=2))
    else:
        print(traces.format_tree(spans, trace_id))
    return 0


def traces_from(settings: Settings) -> list[dict]:
    from shared.telemetry import read_spans

    return read_spans(settings.traces_dir)


async def _registry(nats_url: str) -> dict[str, tuple[int, RegistryEntry]]:
    import nats
    from nats.js.errors import NoKeysError, NotFoundError

    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=1)
    try:
        try:
            kv = await nc.jetstream().key_value(subjects.REGISTRY_BUCKET)
        except NotFoundError:
            return {}
        try:
            keys = await kv.keys()
        except NoKeysError:
            return {}
        out = {}
        for key in keys:
            entry = await kv.get(key)
            out[key] = (entry.revision, RegistryEntry.model_validate_json(entry.value))
        return out
    finally:
        await nc.close()


def cmd_status(args, settings: Settings) -> int:
    try:
        registry = asyncio.run(_registry(settings.nats_url))
    except Exception as e:
        return _fail(f"could not read the registry at {settings.nats_url}: {e}", 1)
    if args.json:
        print(json.dumps({k: {"revision": r, **e.model_dump(mode="json", exclude={"source"})} for k, (r, e) in registry.items()}, indent=2))
        return 0
    if not registry:
        print("no kernels deployed")
    for key, (revision, entry) in sorted(registry.items()):
        print(f"{key}  variant {entry.variant_id}  speedup {entry.speedup:.2f}x  rev {revision}  "
              f"approved by {entry.approved_by}  campaign {entry.campaign_id}")
    return 0


def cmd_up(args, settings: Settings) -> int:
    from shared import supervisor

    if args.demo:
        from observer.demo import run_demo_loop

        signal.signal(signal.SIGTERM, _interrupt)  # stop the services as Ctrl-C would
        try:
            return run_demo_loop(settings, nats_url=None if args.embedded else _given_url(), phase_s=args.phase_s,
                                 shapes=args.shapes, dtype=args.dtype, deadline_s=args.deadline_s)
        except KeyboardInterrupt:
            return 130
    loop = supervisor.start(settings.state_dir, nats_url=_given_url())
    try:
        loop.wait_ready()
    except (RuntimeError, TimeoutError) as e:
        loop.stop()
        return _fail(str(e), 1)
    print(f"kernelloop up: ready. NATS at {loop.nats_url}; services {', '.join(loop.processes)}; "
          f"logs in {settings.state_dir / 'logs'}; Ctrl-C stops")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        while not stopping:
            if dead := loop.dead():
                print(f"kernelloop up: {', '.join(dead)} exited; see its log. Stopping.", file=sys.stderr)
                loop.stop()
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("kernelloop up: stopping")
    loop.stop()
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _shape(text: str) -> list[int]:
    try:
        return [int(d) for d in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not ROWSxHIDDEN, e.g. 16x4096") from None


def _given_url() -> str | None:
    import os

    return os.environ.get("NATS_URL") or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernelloop", description="Keep GPU kernels tuned to the work they really do.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start NATS (unless NATS_URL is set) and the five services")
    up.add_argument("--demo", action="store_true", help="also run the demo workload, and stop when it ends")
    up.add_argument("--embedded", action="store_true", help="with --demo: ignore NATS_URL, use a fresh embedded server")
    up.add_argument("--phase-s", type=float, default=45.0, help="with --demo: seconds of the first usage phase")
    up.add_argument("--deadline-s", type=float, default=480.0, help="with --demo: longest wait for the second deploy")
    up.add_argument("--shapes", type=_shape, nargs=2, default=[[8, 2048], [16, 4096]], metavar="ROWSxHIDDEN",
                    help="with --demo: the shape before and after the shift")
    up.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"], help="with --demo")
    pub = sub.add_parser("publish", help="validate an event and publish it")
    pub.add_argument("subject", choices=sorted(BY_SUBJECT))
    pub.add_argument("file", help="a JSON file, or - for standard input")
    sch = sub.add_parser("schema", help="print a subject's JSON schema")
    sch.add_argument("subject")
    tr = sub.add_parser("trace", help="show a campaign's trace (or list campaigns)")
    tr.add_argument("ident", nargs="?", help="campaign id or trace id")
    sub.add_parser("status", help="deployed kernels per hardware")
    for p in (pub, tr, sub.choices["status"]):
        p.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    use_interpreter_without_gpu()  # before any Triton kernel module is imported
    settings = Settings()
    handler = {"up": cmd_up, "publish": cmd_publish, "schema": cmd_schema, "trace": cmd_trace, "status": cmd_status}
    return handler[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
