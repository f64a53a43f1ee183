"""`kernelloop approve`, `reject` and `rollback`: a person's decisions about what serves a key. Each
is on a trace with who made it."""
import asyncio
import time

from pydantic import ValidationError

from kernelloop import console
from kernelloop.console import BadInput, Failed
from shared import history, subjects
from shared.registry import Registry, Revision, StaleRevision
from shared.schemas import DeployApproval, KernelKey
from shared.settings import Settings


async def _campaign(nats_url: str, campaign_id: str):
    """The deployer's record of a campaign; None if unknown."""
    async with console.connected(nats_url) as nc:
        return await history.campaign(nc.jetstream(), campaign_id)


def _decide(args, settings: Settings, decision: str) -> int:
    """Publish a person's approve/reject on deploy.approval, then wait for the deployer to act on it."""
    who = console.who(args)
    try:
        state = asyncio.run(_campaign(settings.nats_url, args.campaign))
    except Failed as e:
        return console.fail(str(e), 1)
    if state is None:
        return console.fail(f"no campaign {args.campaign!r} known to the deployer (see `kernelloop status`)", 1)
    if state.status != "awaiting_approval":
        return console.fail(f"campaign {args.campaign} is {state.status}, not awaiting approval", 1)
    approval = DeployApproval(campaign_id=args.campaign, decision=decision, by=who, reason=args.reason)
    try:
        seq, trace_id = console.publish_traced(settings, subjects.DEPLOY_APPROVAL, approval, f"{decision} requested",
                                               {"campaign_id": args.campaign, "decided_by": who})
    except Failed as e:
        return console.fail(str(e), 1)
    if not args.json:
        console.progress(f"{decision} by {who} published (stream seq {seq}); "
                         f"waiting up to {args.wait:.0f} s for the deployer")
    want = "deployed" if decision == "approve" else "rejected"
    deadline = time.monotonic() + args.wait
    while True:
        state = asyncio.run(_campaign(settings.nats_url, args.campaign))
        if state.status == want or (state.status != "awaiting_approval" and state.status != "running"):
            break
        if time.monotonic() > deadline:
            return console.fail(f"the deployer has not acted on the {decision} within {args.wait:.0f} s "
                                f"(is it running?); the event stays on {subjects.DEPLOY_APPROVAL} for it", 1)
        time.sleep(0.5)
    out = {"campaign_id": args.campaign, "decision": decision, "by": who, "status": state.status,
           "reason": state.reason, "revision": state.deployed_revision, "trace_id": state.trace_id,
           "request_trace_id": trace_id,
           "variant_id": state.winner.variant_id if state.winner else None}
    if args.json:
        console.print_json(out)
    elif state.status == "deployed":
        print(f"campaign {args.campaign}: {out['variant_id']} deployed at registry revision {state.deployed_revision}, "
              f"approved by {who}; trace {state.trace_id}")
    else:
        print(f"campaign {args.campaign}: {state.status}: {state.reason}")
    return 0 if state.status == want else 1


def cmd_approve(args, settings: Settings) -> int:
    return _decide(args, settings, "approve")


def cmd_reject(args, settings: Settings) -> int:
    return _decide(args, settings, "reject")


async def _rollback(nats_url: str, key: str, to: int | None, who: str, trace_id: str | None) -> Revision:
    """A person's rollback, written by shared/registry.py like every other registry write (it must
    work while the deployer is down: that is when people roll back)."""
    async with console.connected(nats_url) as nc:
        store = await history.kv(nc.jetstream(), subjects.REGISTRY_BUCKET)
        if store is None:
            raise Failed("no registry: nothing was ever deployed")
        try:
            return await Registry(store).rollback(key, approved_by=who, trace_id=trace_id, to=to)
        except ValueError as e:
            raise BadInput(str(e)) from None
        except LookupError as e:
            raise Failed(str(e)) from None
        except StaleRevision as e:
            raise Failed(f"{e}; try again") from None


async def _announce_rollback(nats_url: str, key: KernelKey, revision, previous: str | None, trace_id: str | None):
    """A rollback is a deploy too: the stream records it for tail, report and anyone listening."""
    from shared.schemas import Deploy

    entry = revision.entry
    event = Deploy(campaign_id=entry.campaign_id, key=key, variant_id=entry.variant_id, previous_variant_id=previous,
                   speedup=entry.speedup, speedup_ci_low=entry.speedup, revision=revision.revision,
                   approved_by=entry.approved_by, rollback=True, trace_id=trace_id)
    await console.publish(nats_url, subjects.DEPLOY, event, {"Nats-Msg-Id": event.event_id})


def cmd_rollback(args, settings: Settings) -> int:
    from opentelemetry import trace

    from shared.telemetry import setup_tracing

    try:
        key = KernelKey.parse(args.key)
    except (ValueError, ValidationError) as e:
        return console.fail(str(e).splitlines()[0])
    who = console.who(args)
    provider = setup_tracing("kernelloop-cli", settings.traces_dir, settings.otel_exporter_otlp_endpoint)
    tracer = trace.get_tracer("kernelloop.cli", tracer_provider=provider)
    try:
        with tracer.start_as_current_span("rollback", attributes={"kernel_key": args.key, "op": key.op,
                                                                  "decided_by": who}) as span:
            trace_id = f"{span.get_span_context().trace_id:032x}"
            try:
                before = asyncio.run(history_current(settings.nats_url, args.key))
                revision = asyncio.run(_rollback(settings.nats_url, args.key, args.to, who, trace_id))
                span.set_attribute("revision", revision.revision)
                if revision.entry is not None:
                    span.set_attribute("variant_id", revision.entry.variant_id)
                    asyncio.run(_announce_rollback(settings.nats_url, key, revision, before, trace_id))
            except Failed as e:
                return console.fail(str(e), 1)
            except BadInput as e:
                return console.fail(str(e), 2)
    finally:
        provider.shutdown()
    serves = revision.entry.variant_id if revision.entry else None
    out = {"key": args.key, "revision": revision.revision, "variant_id": serves, "previous_variant_id": before,
           "by": who, "trace_id": trace_id}
    if args.json:
        console.print_json(out)
    else:
        print(f"{args.key}: now served by {serves or 'the op fallback'} (was {before or 'the fallback'}), "
              f"registry revision {revision.revision}, by {who}")
    return 0


async def history_current(nats_url: str, key: str) -> str | None:
    async with console.connected(nats_url) as nc:
        revisions = await history.registry_history(nc.jetstream(), key)
    return revisions[-1][1].variant_id if revisions and revisions[-1][1] else None

