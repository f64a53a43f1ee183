"""The loop's past and present, read back from NATS: events kept in the stream, the registry's
history per key, and the deployer's campaign states; and one line per event for people to read.
What `kernelloop status`, `tail`, `registry` and `report` show; the KV records are read through
shared/registry.py."""
import asyncio
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from shared import subjects
from shared.registry import M, Registry, read_campaign
from shared.schemas import (BY_SUBJECT, BenchResult, CampaignState, CanaryReport, CanaryState, Deploy, DeployApproval,
                            DeployPending, Event, Hypothesis, KernelStats, ProfilerTrace, Refine, RegistryEntry,
                            UsageChanged, VariantReady)


@dataclass
class Kept:
    """One event as the stream keeps it."""

    seq: int
    subject: str
    event: Event | None  # None: the message does not parse as its subject's schema
    raw: bytes


def parse(subject: str, data: bytes) -> Event | None:
    model = BY_SUBJECT.get(subject)
    try:
        return model.model_validate_json(data) if model else None
    except ValidationError:
        return None  # a foreign or older message; shown raw, never fatal to a reader


async def stream_events(js: JetStreamContext, subject: str, limit: int = 100_000) -> list[Kept]:
    """Every kept event of one subject, oldest first (at most limit)."""
    try:
        info = await js.stream_info(subjects.STREAM_NAME, subjects_filter=subject)
    except nats.js.errors.NotFoundError:
        return []
    count = (info.state.subjects or {}).get(subject, 0)
    if not count:
        return []
    sub = await js.subscribe(subject, stream=subjects.STREAM_NAME, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    out = []
    try:
        while len(out) < min(count, limit):
            try:
                msg = await sub.next_msg(timeout=5)
            except nats.errors.TimeoutError:
                break  # fewer than counted: some aged out meanwhile
            out.append(Kept(msg.metadata.sequence.stream, msg.subject, parse(msg.subject, msg.data), msg.data))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


async def kv(js: JetStreamContext, bucket: str):
    try:
        return await js.key_value(bucket)
    except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
        return None


async def keys(store) -> list[str]:
    if store is None:
        return []
    try:
        return sorted(await store.keys())
    except nats.js.errors.NoKeysError:
        return []


async def deployed(js: JetStreamContext) -> dict[str, tuple[int, RegistryEntry]]:
    """key -> (revision, entry) for every key a variant serves now."""
    store = await kv(js, subjects.REGISTRY_BUCKET)
    if store is None:
        return {}
    return {key: (r.revision, r.entry) for key, r in (await Registry(store).deployed()).items()}


async def registry_history(js: JetStreamContext, key: str) -> list[tuple[int, RegistryEntry | None]]:
    """Every kept revision of a key, oldest first; None marks a delete (the op's fallback serves)."""
    store = await kv(js, subjects.REGISTRY_BUCKET)
    if store is None:
        return []
    return [(r.revision, r.entry) for r in await Registry(store).history(key)]


async def campaign(js: JetStreamContext, campaign_id: str) -> CampaignState | None:
    """The deployer's record of one campaign; None if it has none."""
    store = await kv(js, subjects.CAMPAIGN_BUCKET)
    return await read_campaign(store, campaign_id) if store is not None else None


async def _records(js: JetStreamContext, bucket: str, model: type[M]) -> list[M]:
    """Every record of a deployer bucket that reads as its model; the others are skipped."""
    store = await kv(js, bucket)
    records = []
    for key in await keys(store):
        try:
            records.append(model.model_validate_json((await store.get(key)).value))
        except (nats.js.errors.KeyNotFoundError, ValidationError):
            continue
    return records


async def campaign_states(js: JetStreamContext) -> list[CampaignState]:
    """The deployer's record of every campaign that has had a benchmark result."""
    return await _records(js, subjects.CAMPAIGN_BUCKET, CampaignState)


async def canaries(js: JetStreamContext) -> list[CanaryState]:
    """The deployer's canary record of every hardware: the one in flight there, or the last one."""
    return await _records(js, subjects.CANARY_BUCKET, CanaryState)


def canary_line(c: CanaryState) -> str:
    """One canary as `kernelloop status` shows it: what runs against what, the figures so far, the end."""
    key = f"{c.key.op}.{c.key.dtype}.{c.key.bucket}"
    against = f"{c.variant_id} vs {c.incumbent_variant_id or 'fallback'}"
    sources = len(c.windows)
    figures = (f"step {c.step_speedup:.3f}x" + (f" CI [{c.step_speedup_ci[0]:.3f}, {c.step_speedup_ci[1]:.3f}]"
                                                if c.step_speedup_ci else "")
               if c.step_speedup else "no verdict yet")
    evidence = f"{c.judged_windows} windows from {sources} process{'es' if sources != 1 else ''}"
    if c.done:
        return f"{key}  {against}  {c.outcome}  ({figures}, {evidence}; {c.reason})"
    if c.revision is None:
        return f"{key}  {against}  starting"
    state = f"deciding: {c.action}" if c.action else "running"
    return f"{key}  {against}  {state}  {figures}, {evidence}  (rev {c.revision})"


def stage(state: CampaignState) -> str:
    """Where a campaign the deployer knows stands, in words."""
    if state.status == "awaiting_approval":
        w = state.winner
        return f"awaiting approval: {w.variant_id} at {w.weighted_speedup:.2f}x" if w else "awaiting approval"
    if state.status != "running":
        return state.status
    if state.pending == "deploy":
        return f"deploy {state.reason}" if state.reason.startswith("waits for the canary") else "deploy"
    if state.pending == "refine":
        return f"refine: generating round {state.next_round}"
    if state.results:
        r = max(state.results)
        got = len(state.results[r])
        size = next(iter(state.results[r].values())).round_size
        return f"benchmark round {r}: {got}/{size} results"
    return f"generate round {len(state.closed)}"


async def in_flight(js: JetStreamContext) -> list[dict]:
    """Campaigns not yet deployed, exhausted or rejected, with their stage. A campaign the deployer has
    not heard of yet (no result so far) is in its first round of generation and benchmarking."""
    states = {s.campaign.campaign_id: s for s in await campaign_states(js)}
    rows = []
    for kept in await stream_events(js, subjects.HYPOTHESIS):
        if not isinstance(kept.event, Hypothesis):
            continue
        c = kept.event.campaign
        if c.campaign_id not in states:
            rows.append({"campaign_id": c.campaign_id, "key": str(c.key), "status": "running",
                         "stage": "generate and benchmark round 0", "started": kept.event.time.isoformat()})
    for s in states.values():
        if s.status in ("running", "awaiting_approval"):
            rows.append({"campaign_id": s.campaign.campaign_id, "key": str(s.campaign.key), "status": s.status,
                         "stage": stage(s), "rounds_done": s.rounds_done, "reason": s.reason})
    return rows


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "?"


def summary(subject: str, event: Event | None, raw: bytes = b"") -> str:
    """One line a person reads in `kernelloop tail`."""
    if event is None:
        if subject.startswith(subjects.DEAD_LETTER_PREFIX + "."):
            return f"dead letter: {raw[:200].decode(errors='replace')}"
        return f"(not a valid {subject} event) {raw[:160]!r}"
    match event:
        case KernelStats():
            per_call = f"{event.time_us_per_call:.1f} us/call" if event.time_us_per_call else "untimed"
            return f"{event.key}  {event.calls} calls  {per_call}  served by {event.variant_id or 'fallback'}"
        case UsageChanged():
            return f"{event.key}  {event.reason}  {event.detail}".rstrip()
        case Hypothesis():
            c = event.campaign
            return (f"campaign {c.campaign_id}  {c.key}  {event.reason}  expected gain {event.expected_gain:.1%}  "
                    f"budget {c.budget.rounds}x{c.budget.variants_per_round}")
        case VariantReady():
            return (f"campaign {event.campaign.campaign_id}  variant {event.variant_id}  {event.strategy}  "
                    f"round {event.round}  {event.params}")
        case BenchResult():
            tail = f"  {event.error[:80]}" if event.error else ""
            return (f"campaign {event.campaign.campaign_id}  variant {event.variant_id}  {event.status}  "
                    f"{_x(event.weighted_speedup)} [{_x(event.speedup_ci_low)}, {_x(event.speedup_ci_high)}]{tail}")
        case Refine():
            best = f"best {event.best[0].variant_id} {_x(event.best[0].weighted_speedup)}" if event.best else "no best"
            return f"campaign {event.campaign.campaign_id}  round {event.round}  {event.rounds_left} left  {best}"
        case Deploy():
            kind = {"canary": "canary", "withdrawn": "withdraw"}.get(event.stage, "rollback" if event.rollback else
                                                                   "promote" if event.step_speedup else "deploy")
            step = f"  step {_x(event.step_speedup)}" if event.step_speedup else ""
            return (f"{event.key}  {kind} {event.variant_id}  {_x(event.speedup)}{step}  rev {event.revision}  "
                    f"by {event.approved_by}  (was {event.previous_variant_id or 'fallback'})")
        case CanaryReport():
            return (f"{event.key}  canary {event.variant_id} vs {event.incumbent_variant_id or 'fallback'}  "
                    f"{len(event.windows)} windows ({event.measure}) from {event.source}")
        case DeployPending():
            return (f"campaign {event.campaign_id}  {event.key}  {event.variant_id}  {_x(event.speedup)}  waits: "
                    f"{event.policy}")
        case DeployApproval():
            return f"campaign {event.campaign_id}  {event.decision} by {event.by}  {event.reason}".rstrip()
        case ProfilerTrace():
            return f"{event.source}  {event.hardware}  {len(event.trace.get('traceEvents', []))} trace events"
    return event.model_dump_json()[:200]


async def follow(js: JetStreamContext, subject_list: list[str], on_event, from_start: bool = False) -> None:
    """Call on_event(Kept) for every event on the subjects as it arrives, until cancelled."""
    queue: asyncio.Queue = asyncio.Queue()

    async def _put(msg):
        await queue.put(Kept(msg.metadata.sequence.stream, msg.subject, parse(msg.subject, msg.data), msg.data))

    policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
    subs = [await js.subscribe(s, stream=subjects.STREAM_NAME, ordered_consumer=True, deliver_policy=policy, cb=_put)
            for s in subject_list]
    try:
        while True:
            if on_event(await queue.get()) is False:
                return
    finally:
        for sub in subs:
            await sub.unsubscribe()
