"""The `kernelloop` command. Every subcommand takes --json for machine-readable output.

Exit codes: 0 done; 1 failed (no server, nothing found, the loop did not act in time); 2 bad input
(nothing was published or changed)."""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from kernelloop import console, gating, views
from kernelloop.console import Failed
from shared import subjects, traces
from shared.interpreter import use_interpreter_without_gpu
from shared.schemas import BY_SUBJECT, Event
from shared.settings import Settings

EPILOG = "Exit codes: 0 done, 1 failed, 2 bad input. NATS_URL names the server (default nats://127.0.0.1:4222)."

# ---- schema, publish --------------------------------------------------------------------------


def cmd_schema(args, settings: Settings) -> int:
    if args.subject not in BY_SUBJECT:
        return console.fail(f"unknown subject {args.subject!r}; subjects: {', '.join(BY_SUBJECT)}")
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

def cmd_publish(args, settings: Settings) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as e:
        return console.fail(f"cannot read {args.file}: {e.strerror}")
    try:
        event = validate_event(args.subject, text)
    except ValueError as e:
        return console.fail(str(e))
    # A hand-published event roots its own trace, so the campaign it starts can be followed.
    try:
        seq, trace_id = console.publish_traced(settings, args.subject, event)
    except Failed as e:
        return console.fail(str(e), 1)
    print(json.dumps({"subject": args.subject, "event_id": event.event_id, "stream_seq": seq, "trace_id": trace_id})
          if args.json else f"published {args.subject} event {event.event_id} (stream seq {seq}); trace {trace_id}")
    return 0


# ---- trace ------------------------------------------------------------------------------------


def traces_from(settings: Settings) -> list[dict]:
    from shared.telemetry import read_spans

    return read_spans(settings.traces_dir)


def cmd_trace(args, settings: Settings) -> int:
    spans = traces_from(settings)
    if not args.ident:
        found = traces.campaigns(spans)
        if args.json:
            console.print_json(found)
            return 0
        if not found:
            print(f"no campaigns in {settings.traces_dir}")
        for cid, tid in found.items():
            print(f"campaign {cid}  trace {tid}  services: {', '.join(traces.services_in(spans, tid))}")
        return 0
    trace_id = traces.find_trace_id(spans, args.ident)
    if trace_id is None:
        return console.fail(f"no trace or campaign {args.ident!r} in {settings.traces_dir}", 1)
    if args.json:
        console.print_json(traces.spans_of(spans, trace_id))
    else:
        print(traces.format_tree(spans, trace_id))
    return 0

# ---- observe ----------------------------------------------------------------------------------


async def _send_trace(nats_url: str, event, data: bytes, name: str, replicas: int = 1) -> dict:
    """Inline on profiler.trace when the event fits the server's max payload; else the file goes to
    the object-store inbox, which the observer polls."""
    import nats.js.errors
    from nats.js.api import ObjectMeta

    from shared.tracefiles import HARDWARE_HEADER, SOURCE_HEADER

    body = event.model_dump_json().encode()
    async with console.connected(nats_url) as nc:
        js = nc.jetstream()
        try:
            if len(body) + 1024 <= nc.max_payload:  # room for the headers
                ack = await js.publish(subjects.PROFILER_TRACE, body, headers={"Nats-Msg-Id": event.event_id},
                                       timeout=10)
                return {"via": "event", "subject": subjects.PROFILER_TRACE, "stream_seq": ack.seq}
            try:
                store = await js.object_store(subjects.TRACE_OBJECT_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                store = await js.create_object_store(subjects.TRACE_OBJECT_BUCKET, replicas=replicas)
            info = await store.put(f"{event.event_id}-{name}", data, meta=ObjectMeta(
                headers={HARDWARE_HEADER: event.hardware, SOURCE_HEADER: event.source}))
            return {"via": "object", "bucket": subjects.TRACE_OBJECT_BUCKET, "object": info.name}
        except Exception as e:
            hint = " (is the loop up? `kernelloop up` declares the stream)" if "no response" in str(e).lower() else ""
            raise Failed(f"could not send the trace to {nats_url}: {e or type(e).__name__}{hint}") from None


def cmd_observe(args, settings: Settings) -> int:
    import asyncio

    from shared.tracefiles import TraceError, read_trace
    from shared.schemas import ProfilerTrace

    path, max_bytes = Path(args.file), int(settings.trace_max_mb * 2**20)
    try:
        if path.stat().st_size > max_bytes:  # refused unread
            return console.fail(f"{args.file} is {path.stat().st_size / 2**20:.1f} MiB, over the "
                                f"{settings.trace_max_mb:.0f} MiB limit (KERNELLOOP_TRACE_MAX_MB)")
        data = path.read_bytes()
    except OSError as e:
        return console.fail(f"cannot read {args.file}: {e.strerror}")
    try:
        trace_id, hardware, source, trace = read_trace(data, path.name, max_bytes, args.hardware, args.source)
        event = ProfilerTrace(event_id=trace_id, source=source, hardware=hardware, trace=trace)
    except (TraceError, ValidationError) as e:
        return console.fail(f"{args.file}: {str(e).splitlines()[0]}")
    try:
        sent = asyncio.run(_send_trace(settings.nats_url, event, data, path.name, settings.nats_replicas))
    except Failed as e:
        return console.fail(str(e), 1)
    found = {"trace_id": trace_id, "hardware": hardware, "source": source, "events": len(trace["traceEvents"]),
             "bytes": len(data), **sent}
    where = f"on {sent['subject']} (stream seq {sent['stream_seq']})" if sent["via"] == "event" else \
        f"to object {sent['object']} in {sent['bucket']}"
    print(json.dumps(found) if args.json else
          f"sent trace {trace_id} ({len(trace['traceEvents'])} events, {hardware}, {source}) {where}; "
          "`kernelloop status` shows what the observer made of it")
    return 0


# ---- up ---------------------------------------------------------------------------------------


def cmd_up(args, settings: Settings) -> int:
    from shared import supervisor

    if args.demo:
        # the demo is a workload program beside the loop it starts: this process becomes it
        os.execv(sys.executable, [sys.executable, "-m", "observer.demos", *args.forwarded])
    loop = supervisor.start(settings.state_dir, nats_url=_given_url())
    if not args.json:
        console.progress("starting NATS and the five services")
    try:
        loop.wait_ready()
    except (RuntimeError, TimeoutError) as e:
        loop.stop()
        return console.fail(str(e), 1)
    if args.json:
        print(json.dumps({"ready": True, "nats_url": loop.nats_url, "services": list(loop.processes),
                          "logs": str(settings.state_dir / "logs")}), flush=True)
    else:
        print(f"kernelloop up: ready. NATS at {loop.nats_url}; services {', '.join(loop.processes)}; "
              f"logs in {settings.state_dir / 'logs'}; Ctrl-C stops", flush=True)
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
    print("kernelloop up: stopping", file=sys.stderr if args.json else sys.stdout)
    loop.stop()
    return 0


def _shape(text: str) -> list[int]:
    try:
        return [int(d) for d in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not ROWSxHIDDEN, e.g. 16x4096") from None


def _given_url() -> str | None:
    return os.environ.get("NATS_URL") or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelloop",
                                     description="Keep GPU kernels tuned to the work they really do.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description or help_, epilog=EPILOG)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    up = command("up", "start NATS (unless NATS_URL is set) and the five services")
    up.add_argument("--demo", action="store_true", help="also run the demo workload, and stop when it ends")
    up.add_argument("--embedded", action="store_true", help="with --demo: ignore NATS_URL, use a fresh embedded server")
    up.add_argument("--workload", default="auto", choices=["auto", "rmsnorm", "llama"],
                    help="with --demo: rmsnorm on one shape then another, or a Llama-style decoder stack whose "
                         "traffic shifts (decode b1, decode b32, prefill 2k); auto: llama where CUDA is, else rmsnorm")
    up.add_argument("--model", default="kernelloop", choices=["kernelloop", "hf"],
                    help="with --workload llama: observer/demos/llama.py on kernelloop.ops, or transformers' "
                         "LlamaForCausalLM (random weights) with kernelloop.patch (norms, SwiGLU, rotary)")
    up.add_argument("--preset", default=None, choices=["8b", "70b", "tiny"],
                    help="with --workload llama: the stack's dims (default 8b on CUDA, tiny otherwise)")
    up.add_argument("--phase-s", type=float, default=None,
                    help="with --demo: seconds of the first usage phase (rmsnorm, 45) or of each phase (llama, 90)")
    up.add_argument("--deadline-s", type=float, default=None,
                    help="with --demo: longest wait for the second deploy (rmsnorm, 480), or longest the traffic "
                         "runs from its first phase (llama, 300)")
    up.add_argument("--shapes", type=_shape, nargs=2, default=[[8, 1024], [16, 2048]], metavar="ROWSxHIDDEN",
                    help="with --workload rmsnorm: the shape before and after the shift")
    up.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="with --demo (rmsnorm: float16, llama: bfloat16)")

    command("status", "deployed kernels per hardware, and campaigns in flight with their stage")
    tail = command("tail", "follow events live, one readable line each",
                   "Follow events as they arrive (all subjects unless named), one readable line each.")
    tail.add_argument("subjects", nargs="*", metavar="SUBJECT", help=f"any of: {', '.join(subjects.ALL)}")
    tail.add_argument("--all", action="store_true", help="start from the oldest kept event, not from now")
    tail.add_argument("--count", type=int, help="stop after this many events")
    tail.add_argument("--timeout", type=float, help="stop after this many seconds")

    pub = command("publish", "validate an event and publish it",
                  "Validate a hand-written event against its subject's schema and publish it as the root of a trace.")
    pub.add_argument("subject", choices=sorted(BY_SUBJECT))
    pub.add_argument("file", help="a JSON file, or - for standard input")
    sch = command("schema", "print a subject's JSON schema")
    sch.add_argument("subject")
    tr = command("trace", "show a campaign's trace as a tree with durations (or list campaigns)")
    tr.add_argument("ident", nargs="?", help="campaign id or trace id")

    for name, verb in (("approve", "deploy"), ("reject", "refuse")):
        p = command(name, f"{verb} the winner of a campaign that awaits approval",
                    f"Publish a {name} on {subjects.DEPLOY_APPROVAL} and wait for the deployer to act on it.")
        p.add_argument("campaign", help="the campaign id (see `kernelloop status`)")
        p.add_argument("--by", help="who decides (default: KERNELLOOP_USER, else the login name)")
        p.add_argument("--reason", default="", help="why, for the trace and the record")
        p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the deployer (default 60)")

    rb = command("rollback", "serve a key with its previous variant (or a given registry revision)")
    rb.add_argument("key", help="<hardware>.<op>.<dtype>.<bucket>")
    rb.add_argument("--to", type=int, metavar="REV", help="the registry revision whose variant should serve again")
    rb.add_argument("--by", help="who rolls back (default: KERNELLOOP_USER, else the login name)")

    reg = command("registry", "the history of a registry key (or every deployed key)")
    reg.add_argument("key", nargs="?", help="<hardware>.<op>.<dtype>.<bucket>")

    hl = command("health", "exit 0 when a service's consumers are pulling or working (container healthchecks)")
    hl.add_argument("service", choices=sorted({d.split("-")[0] for d in subjects.DURABLE.values()}))

    sim = sub.add_parser("simulate", help="simulated kernel.stats windows (stationary, shifts, bursts, ...)",
                         description="The detector's stream simulator; `kernelloop simulate --help` lists scenarios.",
                         add_help=False)
    sim.add_argument("rest", nargs=argparse.REMAINDER)

    op = command("op", "add an op from a KernelBench-format file (Model, get_inputs, get_init_inputs)")
    op.add_argument("action", choices=["add"])
    op.add_argument("file", help="a Python file in the KernelBench problem format")
    op.add_argument("--name", help="the op's name (default: the file's stem)")

    ob = command("observe", "send a PyTorch profiler trace to the observer service",
                 "Send a torch.profiler Chrome trace (recorded with record_shapes=True; .json or .json.gz) to the "
                 "observer service, which turns it into kernel.stats and lists the hot ops no catalog op covers.")
    ob.add_argument("what", choices=["trace"])
    ob.add_argument("file", help="the trace file that export_chrome_trace wrote")
    ob.add_argument("--hardware", help="the registry's hardware key (default: the trace's first GPU, else "
                                       "cpu-interpreter)")
    ob.add_argument("--source", help="where the trace comes from (default: the trace's host:file name)")

    rp = command("report", "write an HTML page with PNG charts of the loop's history")
    rp.add_argument("--out", help="folder for report.html and the charts (default: <state dir>/report)")
    return parser


def cmd_op(args, settings: Settings) -> int:
    from shared.ops.kernelbench import OpFileError
    from shared.userops import register_op_file

    try:
        module = register_op_file(args.file, settings.user_ops_dir, name=args.name)
    except (OpFileError, OSError) as e:
        return console.fail(str(e))
    found = {"op": module.NAME, "state_dir": str(settings.state_dir)}
    print(json.dumps(found) if args.json else
          f"added op {module.NAME}: services sharing {settings.state_dir} observe, tune and deploy it")
    return 0


def cmd_simulate(args, settings: Settings | None) -> int:
    # the detector's own program, with its own parser (--help included); this process becomes it
    os.execv(sys.executable, [sys.executable, "-m", "detector.simulator", *args.rest])


HANDLERS = {"op": cmd_op, "simulate": cmd_simulate, "up": cmd_up, "publish": cmd_publish, "schema": cmd_schema, "trace": cmd_trace,
            "status": views.cmd_status, "tail": views.cmd_tail, "registry": views.cmd_registry,
            "health": views.cmd_health, "report": views.cmd_report,
            "approve": gating.cmd_approve, "reject": gating.cmd_reject, "rollback": gating.cmd_rollback,
            "observe": cmd_observe}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:  # its own parser, --help included
        return cmd_simulate(argparse.Namespace(rest=argv[1:]), None)
    args = build_parser().parse_args(argv)
    args.forwarded = argv[1:]  # what `up --demo` hands over to the demo
    use_interpreter_without_gpu()  # before any Triton kernel module is imported
    settings = Settings()
    return HANDLERS[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
