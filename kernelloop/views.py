"""`kernelloop status`, `registry`, `health`, `tail` and `report`: what the loop is doing and did."""
import asyncio
import json
import time
from pathlib import Path

import nats.js.errors
from pydantic import ValidationError

from kernelloop import console
from kernelloop.console import Failed
from shared import history, subjects
from shared.schemas import BY_SUBJECT, KernelKey, TraceSummary
from shared.settings import Settings


TRACES_SHOWN = 5  # the latest ingested traces `status` lists


async def _trace_summaries(js) -> list[TraceSummary]:
    """What the observer made of the latest profiler traces, newest first."""
    store = await history.kv(js, subjects.TRACE_SUMMARY_BUCKET)
    found = []
    for key in await history.keys(store):
        try:
            found.append(TraceSummary.model_validate_json((await store.get(key)).value))
        except (nats.js.errors.KeyNotFoundError, ValidationError):
            continue  # deleted meanwhile, or written by another version
    return sorted(found, key=lambda t: t.ingested_at, reverse=True)[:TRACES_SHOWN]


async def _status(nats_url: str) -> dict:
    async with console.connected(nats_url) as nc:
        js = nc.jetstream()
        deployed = await history.deployed(js)
        campaigns = await history.in_flight(js)
        canaries = await history.canaries(js)
        traces = await _trace_summaries(js)
    return {"deployed": {k: {"revision": r, **e.model_dump(mode="json", exclude={"source"})}
                         for k, (r, e) in sorted(deployed.items())},
            "campaigns": campaigns,
            "canaries": [{**c.model_dump(mode="json", exclude={"windows"}), "line": history.canary_line(c)}
                         for c in canaries],
            "traces": [t.model_dump(mode="json") for t in traces]}


def format_trace(t: dict) -> list[str]:
    """One ingested trace: its mapped ops, its hot unmapped ops with their share of time, what was skipped."""
    when = t["ingested_at"][:19].replace("T", " ")
    lines = [f"  {t['source']}  {t['hardware']}  {when}  {t['status']}"
             + (f": {t['error']}" if t["error"] else f"  {t['total_time_us'] / 1e3:.1f} ms of ops")]
    for m in t["mapped"]:
        k = m["key"]
        key = f"{k['op']}.{k['dtype']}.{k['bucket']}"
        lines.append(f"    mapped    {key:<40} {m['calls']:>6} calls "
                     f"{m['time_us'] / 1e3:>9.2f} ms {m['share']:>6.1%}  <- {', '.join(m['from_ops'])}")
    for u in t["unmapped"]:
        shape = "x".join(map(str, u["shape"])) if u["shape"] else "?"
        note = f"  ({u['note']})" if u["note"] else ""
        lines.append(f"    unmapped  {u['name']:<40} {u['calls']:>6} calls {u['time_us'] / 1e3:>9.2f} ms "
                     f"{u['share']:>6.1%}  {shape} {u['dtype'] or ''}{note}")
    lines += [f"    skipped   {line}" for line in t["skipped"][:5]]
    return lines


def cmd_status(args, settings: Settings) -> int:
    try:
        status = asyncio.run(_status(settings.nats_url))
    except Failed as e:
        return console.fail(str(e), 1)
    if args.json:
        console.print_json(status)
        return 0
    by_hardware: dict[str, list[tuple[str, dict]]] = {}
    for key, row in status["deployed"].items():
        by_hardware.setdefault(key.split(".", 1)[0], []).append((key.split(".", 1)[1], row))
    print("deployed kernels" if by_hardware else "deployed kernels: none")
    for hardware, rows in sorted(by_hardware.items()):
        print(f"  {hardware}")
        for key, row in rows:
            step = f" (step {row['step_speedup']:.2f}x)" if row.get("step_speedup") else ""
            print(f"    {key:<32} {row['variant_id']}  {row['speedup']:.2f}x  {row.get('stage', 'promoted')}{step}  "
                  f"rev {row['revision']}  by {row['approved_by']}  campaign {row['campaign_id']}")
    print("campaigns in flight" if status["campaigns"] else "campaigns in flight: none")
    for c in status["campaigns"]:
        print(f"  {c['campaign_id']}  {c['key']}  {c['stage']}")
    print("canaries (one at a time per hardware)" if status["canaries"] else "canaries: none")
    for c in status["canaries"]:
        print(f"  {c['hardware']}  {'last: ' if c['done'] else ''}{c['line']}")
        if c["waiting"]:
            print(f"    waiting their turn: campaigns {', '.join(c['waiting'])}")
    print("profiler traces (hot ops, share of the trace's op time)" if status["traces"] else "profiler traces: none")
    for t in status["traces"]:
        print("\n".join(format_trace(t)))
    return 0


async def _registry(nats_url: str, key: str | None) -> dict:
    async with console.connected(nats_url) as nc:
        js = nc.jetstream()
        if key is None:
            return {"keys": {k: {"revision": r, "variant_id": e.variant_id, "speedup": e.speedup}
                             for k, (r, e) in (await history.deployed(js)).items()}}
        revisions = await history.registry_history(js, key)
    if not revisions:
        raise Failed(f"registry key {key} has no history")
    return {"key": key, "history": [
        {"revision": r, **(e.model_dump(mode="json", exclude={"source"}) if e else {"variant_id": None})}
        for r, e in revisions]}


def cmd_registry(args, settings: Settings) -> int:
    if args.key:
        try:
            KernelKey.parse(args.key)
        except ValueError as e:
            return console.fail(str(e).splitlines()[0])
    code = console.run(_registry_json(settings.nats_url, args))
    return code


async def _registry_json(nats_url: str, args) -> int:
    found = await _registry(nats_url, args.key)
    if args.json:
        console.print_json(found)
        return 0
    if args.key is None:
        print("registry keys" if found["keys"] else "registry: no kernels deployed")
        for key, row in sorted(found["keys"].items()):
            print(f"  {key}  rev {row['revision']}  {row['variant_id']}  {row['speedup']:.2f}x")
        return 0
    print(f"history of {args.key} (oldest first)")
    for row in found["history"]:
        if row["variant_id"] is None:
            print(f"  rev {row['revision']:<4} fallback serves (entry deleted)")
            continue
        when = row["deployed_at"][:19].replace("T", " ")
        print(f"  rev {row['revision']:<4} {row['variant_id']}  {row['speedup']:.2f}x  {row.get('stage', 'promoted')}  "
              f"{when}  by {row['approved_by']}  "
              f"campaign {row['campaign_id']}  (was {row['previous_variant_id'] or 'fallback'})")
    return 0


def _service_consumers(service: str) -> list[str]:
    return [d for d in subjects.DURABLE.values() if d.split("-")[0] == service]


async def _health(nats_url: str, service: str, patience_s: float = 3.0) -> dict:
    """A stage is healthy while each of its durable consumers has a pull request waiting or a message
    in hand: its process is connected and pulling, or working."""
    import nats.js.errors

    async with console.connected(nats_url) as nc:
        js = nc.jetstream()
        deadline = time.monotonic() + patience_s
        while True:
            rows = {}
            for durable in _service_consumers(service):
                try:
                    info = await js.consumer_info(subjects.STREAM_NAME, durable)
                    rows[durable] = {"exists": True, "waiting": info.num_waiting or 0,
                                     "working": info.num_ack_pending or 0, "pending": info.num_pending or 0}
                except nats.js.errors.NotFoundError:
                    rows[durable] = {"exists": False}
            healthy = all(r["exists"] and (r["waiting"] or r["working"]) for r in rows.values())
            if healthy or time.monotonic() > deadline:
                return {"service": service, "healthy": healthy, "consumers": rows}
            await asyncio.sleep(0.25)


def cmd_health(args, settings: Settings) -> int:
    try:
        report = asyncio.run(_health(settings.nats_url, args.service))
    except Failed as e:
        return console.fail(str(e), 1)
    if args.json:
        console.print_json(report)
    else:
        print(f"{args.service}: {'healthy' if report['healthy'] else 'NOT healthy'}  " + "  ".join(
            f"{d}: " + (f"{r['waiting']} pulling, {r['working']} in hand, {r['pending']} queued" if r["exists"]
                        else "no consumer") for d, r in report["consumers"].items()))
    return 0 if report["healthy"] else 1


async def _tail(nats_url: str, subject_list: list[str], as_json: bool, count: int | None, timeout: float | None,
                from_start: bool) -> int:
    seen = 0

    def show(kept: history.Kept) -> bool:
        nonlocal seen
        seen += 1
        if as_json:
            body = kept.event.model_dump(mode="json") if kept.event else kept.raw.decode(errors="replace")
            print(json.dumps({"seq": kept.seq, "subject": kept.subject, "event": body}), flush=True)
        else:
            when = kept.event.time.strftime("%H:%M:%S") if kept.event else "--:--:--"
            print(f"{when}  {kept.subject:<15} {history.summary(kept.subject, kept.event, kept.raw)}", flush=True)
        return count is None or seen < count

    async with console.connected(nats_url) as nc:
        try:
            await asyncio.wait_for(history.follow(nc.jetstream(), subject_list, show, from_start), timeout)
        except asyncio.TimeoutError:
            pass
        except Exception as e:
            if "not found" in str(e).lower() or "no response" in str(e).lower():
                raise Failed(f"no stream {subjects.STREAM_NAME} at {nats_url} (is the loop up?)") from None
            raise
    return 0


def cmd_tail(args, settings: Settings) -> int:
    chosen = args.subjects or list(subjects.ALL)
    unknown = [s for s in chosen if s not in BY_SUBJECT and s not in subjects.ALL]
    if unknown:
        return console.fail(f"unknown subject(s) {', '.join(unknown)}; subjects: {', '.join(subjects.ALL)}")
    if not args.json:
        console.progress(f"following {', '.join(chosen)} at {settings.nats_url}; Ctrl-C stops")
    try:
        return console.run(_tail(settings.nats_url, chosen, args.json, args.count, args.timeout, args.all))
    except KeyboardInterrupt:
        return 0


async def _collect(nats_url: str, progress):
    from shared import report

    async with console.connected(nats_url) as nc:
        return await report.collect(nc.jetstream(), progress)


def cmd_report(args, settings: Settings) -> int:
    from shared import report

    out = Path(args.out or settings.state_dir / "report")
    try:
        data = asyncio.run(_collect(settings.nats_url, console.progress if not args.json else None))
    except Failed as e:
        return console.fail(str(e), 1)
    page = report.write(data, out, console.progress if not args.json else None)
    if args.json:
        console.print_json({"html": str(page), "charts": sorted(str(p) for p in out.glob("*.png")),
                     "keys": len(data.deploys_by_key), "campaigns": len(data.campaigns)})
    else:
        print(f"report written to {page}")
    return 0

