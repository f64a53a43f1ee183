"""Junk on every subject the loop consumes, through a real NATS to the five running services: valid
events with a field dropped or given a wrong type, NaN, a negative or huge number, an unknown
schema_version, cut-off JSON and random bytes. Every one is dead-lettered exactly once per consumer
with a reason naming the field, no service dies, and nothing is deployed."""
import asyncio
import copy
import json
import math
import time
from datetime import datetime, timezone

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared import subjects, supervisor
from shared.schemas import (BY_SUBJECT, BenchResult, Campaign, CanaryReport, CanaryWindow, DeadLetter, DeployApproval,
                            Hardware, Hypothesis, KernelKey, KernelStats, ProfilerTrace, Refine, ShapeCount,
                            UsageChanged, VariantReady, WeightedShape)
from test_crash_recovery import FAST, _unfinished

pytestmark = [pytest.mark.e2e, pytest.mark.nats]

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
CAMPAIGN = Campaign(campaign_id="fuzz", key=KEY, profile=[WeightedShape(shape=[8, 1024], weight=1.0)])
HARDWARE = Hardware(key=KEY.hardware, name="CPU", interpreter=True, torch="-", triton="-")
BATCHES, PER_BATCH = 200, 12  # 2,400 generated, of which ~85 % junk

# One valid event per consumed subject: the starting point of every mutation.
VALID = {
    subjects.KERNEL_STATS: KernelStats(key=KEY, source="fuzz:1", window_start=datetime.now(timezone.utc), window_s=5.0,
                                       calls=10, shapes=[ShapeCount(shape=[8, 1024], calls=10)], sampled_calls=1,
                                       sampled_time_us=10.0),
    subjects.USAGE_CHANGED: UsageChanged(key=KEY, reason="manual", profile=CAMPAIGN.profile),
    subjects.HYPOTHESIS: Hypothesis(campaign=CAMPAIGN, reason="manual"),
    subjects.REFINE: Refine(campaign=CAMPAIGN, round=1, rounds_left=1),
    subjects.VARIANT_READY: VariantReady(campaign=CAMPAIGN, variant_id="v", source="x = 1", strategy="grid", round=0,
                                         round_size=1),
    subjects.BENCH_RESULT: BenchResult(campaign=CAMPAIGN, variant_id="v", source="x = 1", strategy="grid", round=0,
                                       round_size=1, status="incorrect", hardware=HARDWARE),
    subjects.PROFILER_TRACE: ProfilerTrace(source="fuzz", hardware=KEY.hardware, trace={"traceEvents": []}),
    subjects.DEPLOY_APPROVAL: DeployApproval(campaign_id="fuzz", decision="reject", by="fuzz"),
    subjects.CANARY_REPORT: CanaryReport(key=KEY, variant_id="v", revision=1, source="fuzz:1", measure="key",
                                         windows=[CanaryWindow(step_kind=str(KEY), window=0, candidate_us=9.0,
                                                               incumbent_us=10.0, candidate_steps=3,
                                                               incumbent_steps=3)]),
}
VALID_JSON = {s: e.model_dump(mode="json") for s, e in VALID.items()}
# Every durable consumer of each subject: each one dead-letters a message on its own.
CONSUMERS = {s: [d for subject, d in subjects.DURABLE.items() if subject == s] for s in VALID}
CONSUMERS[subjects.BENCH_RESULT].append(subjects.GENERATOR_RESULTS_DURABLE)
CONSUMERS[subjects.USAGE_CHANGED].append(subjects.REGRESSION_DURABLE)

BAD_VALUES = [None, "", "junk", -1, -1e308, 1e308, 10**40, True, [], {}, [1, "x"], "\x00", math.nan, math.inf]


def _paths(value, prefix=()) -> list[tuple]:
    """Every place in a JSON tree a mutation can hit."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _mutate(tree, path: tuple, value=None, drop=False):
    tree = copy.deepcopy(tree)
    node = tree
    for step in path[:-1]:
        node = node[step]
    if drop and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


@st.composite
def junk(draw) -> tuple[str, bytes, str]:
    """(subject, payload, the field its dead letter must name, '' for undecodable bytes)."""
    subject = draw(st.sampled_from(sorted(VALID)))
    valid = VALID_JSON[subject]
    kind = draw(st.sampled_from(["set", "set", "drop", "version", "bytes", "cut"]))
    if kind == "bytes":
        return subject, draw(st.binary(max_size=64)), ""
    if kind == "cut":
        text = json.dumps(valid).encode()
        return subject, text[:draw(st.integers(0, len(text) - 1))], ""
    if kind == "version":
        path, value, drop = ("schema_version",), draw(st.sampled_from([0, 2, 99, "one", None])), False
    else:
        path = draw(st.sampled_from(_paths(valid)))
        value, drop = draw(st.sampled_from(BAD_VALUES)), kind == "drop"
    return subject, json.dumps(_mutate(valid, path, value, drop)).encode(), _field(path)


def _field(path: tuple) -> str:
    """The field a dead letter names for a change at path: a list item is named by its list, since a
    validator may check the list as a whole (every dimension of a shape positive)."""
    while isinstance(path[-1], int):
        path = path[:-1]
    return ".".join(str(p) for p in path)


def _is_valid(subject: str, payload: bytes) -> bool:
    """As a service decodes it: JSON (NaN allowed, as Python reads it), then the subject's model."""
    try:
        BY_SUBJECT[subject].model_validate(json.loads(payload))
        return True
    except (ValueError, ValidationError, UnicodeDecodeError):
        return False


async def _publish(url: str, batch: list[tuple[str, bytes, str]], sent: dict[str, tuple]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for subject, payload, field in batch:
            if _is_valid(subject, payload):
                continue  # a valid event is real work, not junk: other tests cover those
            msg_id = f"fuzz-{len(sent)}"
            await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
            sent[msg_id] = (subject, field)
    finally:
        await nc.close()


async def _dead_letters(nc) -> list[DeadLetter]:
    js, dead = nc.jetstream(), f"{subjects.DEAD_LETTER_PREFIX}.>"
    stored = sum(((await js.stream_info(subjects.STREAM_NAME, subjects_filter=dead)).state.subjects or {}).values())
    sub = await js.pull_subscribe(dead, stream=subjects.STREAM_NAME)
    letters, deadline = {}, time.monotonic() + 60
    while len(letters) < stored and time.monotonic() < deadline:  # a busy server may answer a fetch short
        try:
            for m in await sub.fetch(500, timeout=5):
                letters[m.metadata.sequence.stream] = DeadLetter.model_validate_json(m.data)  # once, if redelivered
                await m.ack()
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            pass
    return list(letters.values())


async def _settle(loop: supervisor.Loop, deadline_s: float) -> tuple:
    nc = await nats.connect(loop.nats_url)
    try:
        deadline = time.monotonic() + deadline_s
        while (unfinished := await _unfinished(nc)) and time.monotonic() < deadline:
            assert not loop.dead(), f"{loop.dead()} died on junk; see {loop.state_dir / 'logs'}"
            await asyncio.sleep(1)
        info = await nc.jetstream().stream_info(subjects.STREAM_NAME, subjects_filter=subjects.DEPLOY)
        return unfinished, await _dead_letters(nc), (info.state.subjects or {}).get(subjects.DEPLOY, 0)
    finally:
        await nc.close()


def test_junk_on_every_subject_is_dead_lettered_naming_the_field_and_nothing_dies(tmp_path):
    loop = supervisor.start(tmp_path, env=FAST)
    sent: dict[str, tuple[str, str]] = {}
    try:
        loop.wait_ready()

        @settings(max_examples=BATCHES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(junk(), min_size=PER_BATCH, max_size=PER_BATCH))
        def publish_junk(batch):
            asyncio.run(_publish(loop.nats_url, batch, sent))

        publish_junk()
        assert len(sent) > BATCHES * PER_BATCH // 2, "most generated events should be junk"
        assert {s for s, _ in sent.values()} == set(VALID), "junk on every consumed subject"
        unfinished, letters, deploys = asyncio.run(_settle(loop, 240))
        assert not loop.dead(), f"{loop.dead()} died on junk; see {loop.state_dir / 'logs'}"
    finally:
        loop.stop()
    assert unfinished == {}, f"junk left unprocessed: {unfinished}"
    assert deploys == 0, "junk deployed something"
    by_id: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        by_id.setdefault(letter.original_event_id, []).append(letter)
    for msg_id, (subject, field) in sent.items():
        got = by_id.get(msg_id, [])
        assert sorted(letter.consumer for letter in got) == sorted(CONSUMERS[subject]), (msg_id, subject, got)
        for letter in got:
            assert letter.subject == subject, letter
            assert field in letter.reason, f"{msg_id}: the reason does not name {field!r}: {letter.reason}"
