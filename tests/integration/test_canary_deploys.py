"""Canaries against a real nats-server with the deployer service in-process: a deploy starts as a
canary; the workloads' canary.report windows decide it. Simulated workloads (two processes whose
step is 1.35x slower, or 1.1x faster, under lognormal noise, bursts and drift) withdraw or promote
it; a second winner on the hardware waits its turn; a canary nobody reports on is withdrawn at its
time limit. Then real workloads: the SDK in this process with its real dispatch table, serving a
variant that the interpreter runs slower than the fallback (withdrawn, on the key's time per call)
or faster (promoted, on a model's step time)."""
import asyncio
import threading
import time

import pytest
import torch

from deployer.canary_run import ROLLBACK_BY, SWEEP_S, settle
from deployer.canary_state import CanaryStore
from kernelloop import views
from observer.sdk import observe, ops
from shared import subjects
from shared.canary import summarise
from shared.ops import rmsnorm
from shared.registry import withdrawn
from shared.schemas import (Budget, Campaign, CanaryReport, CanaryState, CanaryWindow, Deploy, Incumbent, KernelKey,
                            RegistryEntry, WeightedShape)
from support.step_streams import simulate
from test_deployer import HARDWARE, KEY, bench, running_deployer

pytestmark = pytest.mark.nats

OTHER_KEY = KEY.model_copy(update={"bucket": "h2048-r16"})


def campaign_for(campaign_id: str, key: KernelKey = KEY, incumbent: RegistryEntry | None = None,
                 rounds: int = 3) -> Campaign:
    inc = Incumbent(variant_id=incumbent.variant_id, source=incumbent.source, params=incumbent.params) \
        if incumbent else Incumbent()
    return Campaign(campaign_id=campaign_id, key=key, profile=[WeightedShape(shape=[16, key_hidden(key)], weight=1.0)],
                    incumbent=inc, budget=Budget(rounds=rounds, variants_per_round=1))


def key_hidden(key: KernelKey) -> int:
    return int(key.bucket.split("-")[0][1:])


def simulated_reports(key: KernelKey, variant_id: str, revision: int, factor: float, source: str, seed: int,
                      per_report: int = 2) -> list[CanaryReport]:
    """A workload process's reports: a step `factor` times the incumbent's, a couple of windows each."""
    pairs = summarise(simulate(seed, {"decode:b16": factor}, windows=40), source)
    windows = [CanaryWindow(step_kind=p.step_kind, window=p.window, candidate_us=p.candidate_us,
                            incumbent_us=p.incumbent_us, candidate_steps=p.candidate_steps,
                            incumbent_steps=p.incumbent_steps) for p in pairs]
    return [CanaryReport(key=key, variant_id=variant_id, revision=revision, source=source, measure="step",
                         windows=windows[i:i + per_report]) for i in range(0, len(windows), per_report)]


async def publish_until(h, batches: list[CanaryReport], done, timeout: float = 30.0) -> None:
    """Publish reports one by one, as two processes would, until done() holds; then wait for it."""
    deadline = time.monotonic() + timeout
    for report in batches:
        if await done():
            return
        await h.js.publish(subjects.CANARY_REPORT, report.model_dump_json().encode(),
                           headers={"Nats-Msg-Id": report.event_id})
        await asyncio.sleep(0.05)
    while not await done():
        assert time.monotonic() < deadline, "the canary was not decided"
        await asyncio.sleep(0.1)


async def deploys(h, at_least: int = 0, timeout: float = 15.0) -> list[Deploy]:
    """The Deploy events kept so far; with at_least, waited for: the deployer writes the registry
    first and publishes the event after, so a test that saw the registry change may be early."""
    deadline = time.monotonic() + timeout
    while True:
        sub = await h.js.pull_subscribe(subjects.DEPLOY, stream=subjects.STREAM_NAME)
        try:
            msgs = await sub.fetch(50, timeout=1)
        except (asyncio.TimeoutError, Exception):
            msgs = []
        finally:
            await sub.unsubscribe()
        if len(msgs) >= at_least or time.monotonic() > deadline:
            return [Deploy.model_validate_json(m.data) for m in msgs]
        await asyncio.sleep(0.2)


async def canary_record(h, hardware: str) -> CanaryState:
    kv = await h.js.key_value(subjects.CANARY_BUCKET)
    return CanaryState.model_validate_json((await kv.get(hardware)).value)


def interleave(*streams):
    return [r for batch in zip(*streams) for r in batch]


async def test_canary_of_a_step_135x_slower_is_withdrawn_and_the_gate_never_deploys_it_again(nats_url, tmp_path):
    old = bench(campaign_for("camp-old"), 512, 1.2, 1.1)
    old_entry = RegistryEntry(variant_id=old.variant_id, source=old.source, params=old.params, speedup=1.2,
                              campaign_id="camp-old", approved_by="auto-gate")
    slow = bench(campaign_for("camp-slow", incumbent=old_entry), 256, 1.5, 1.4, round_size=1)
    async with running_deployer(nats_url, tmp_path) as h:
        await h.registry.write(KEY, old_entry, None)
        await h.handled(await h.send(slow))
        (canary,) = await deploys(h)
        assert canary.stage == "canary" and canary.variant_id == slow.variant_id
        assert canary.previous_variant_id == old.variant_id
        current = await h.registry.read(KEY)
        assert current.entry.stage == "canary" and current.revision == canary.revision

        async def rolled_back():
            return (await h.registry.read(KEY)).entry.variant_id == old.variant_id

        await publish_until(h, interleave(
            simulated_reports(KEY, slow.variant_id, canary.revision, 1.35, "host:1", seed=11),
            simulated_reports(KEY, slow.variant_id, canary.revision, 1.35, "host:2", seed=12)), rolled_back)
        restored = await h.registry.read(KEY)
        assert restored.entry.approved_by == ROLLBACK_BY and restored.entry.stage == "promoted"
        history = await h.registry.history(KEY)
        assert not [r for r in history if r.entry and r.entry.variant_id == slow.variant_id
                    and r.entry.stage == "promoted"], "the slower variant never reached promoted"
        assert slow.variant_id in withdrawn(history)

        events = await deploys(h, at_least=2)
        assert [e.stage for e in events] == ["canary", "withdrawn"]
        withdraw = events[1]
        assert withdraw.rollback and withdraw.variant_id == old.variant_id
        assert withdraw.previous_variant_id == slow.variant_id and withdraw.approved_by == ROLLBACK_BY
        assert withdraw.step_speedup < 1 and withdraw.step_speedup_ci_high < 1
        assert withdraw.trace_id == canary.trace_id and withdraw.revision == restored.revision

        (span,) = [s for s in h.spans.get_finished_spans() if s.name == "canary.decide"]
        assert span.attributes["action"] == "withdraw" and span.attributes["speedup"] < 1
        assert span.attributes["windows"] >= 6 and span.attributes["sources"] == 2
        assert f"{span.context.trace_id:032x}" == canary.trace_id, "the decision is on the campaign's trace"
        record = await canary_record(h, KEY.hardware)
        assert record.done and record.outcome.startswith("withdrawn")

        # A later campaign finds the same variant best again: the gate refuses it for this key.
        again = bench(campaign_for("camp-again", incumbent=old_entry, rounds=1), 256, 1.5, 1.4, round_size=1)
        await h.handled(await h.send(again))
        state = await h.store.get("camp-again")
        assert state.status == "exhausted" and "rolled back" in state.reason
        assert len(await deploys(h)) == 2 and (await h.registry.read(KEY)).revision == restored.revision


async def test_canary_of_a_step_11x_faster_is_promoted(nats_url, tmp_path):
    fast = bench(campaign_for("camp-fast"), 1024, 1.4, 1.3, round_size=1)
    async with running_deployer(nats_url, tmp_path) as h:
        await h.handled(await h.send(fast))
        (canary,) = await deploys(h)

        async def promoted():
            return (await h.registry.read(KEY)).entry.stage == "promoted"

        await publish_until(h, interleave(
            simulated_reports(KEY, fast.variant_id, canary.revision, 1 / 1.1, "host:1", seed=21),
            simulated_reports(KEY, fast.variant_id, canary.revision, 1 / 1.1, "host:2", seed=22)), promoted)
        current = await h.registry.read(KEY)
        assert current.entry.variant_id == fast.variant_id and current.revision == canary.revision + 1
        assert current.entry.step_speedup > 1 and withdrawn(await h.registry.history(KEY)) == {}
        events = await deploys(h, at_least=2)
        assert [e.stage for e in events] == ["canary", "promoted"]
        assert events[1].step_speedup_ci_low > 1 and events[1].revision == current.revision
        assert events[1].event_id == "promote-camp-fast" and not events[1].rollback
        (span,) = [s for s in h.spans.get_finished_spans() if s.name == "canary.decide"]
        assert span.attributes["action"] == "promote" and span.attributes["speedup_ci_low"] > 1

        status = await views._status(nats_url)  # what `kernelloop status` prints from
        assert status["deployed"][str(KEY)]["stage"] == "promoted"
        (shown,) = status["canaries"]
        assert shown["done"] and shown["line"].startswith(f"rmsnorm.float32.h1024-r16  {fast.variant_id} vs fallback  "
                                                          f"promoted at revision {current.revision}")
        assert "windows from 2 processes" in shown["line"]


async def test_second_winner_on_the_hardware_waits_for_the_canary_and_deploys_when_it_ends(nats_url, tmp_path):
    first = bench(campaign_for("camp-first"), 1024, 1.4, 1.3, round_size=1)
    second = bench(campaign_for("camp-second", OTHER_KEY), 1024, 1.3, 1.2, round_size=1)
    async with running_deployer(nats_url, tmp_path) as h:
        await h.handled(await h.send(first))
        await h.handled(await h.send(second))
        (canary,) = await deploys(h)
        assert canary.campaign_id == "camp-first"
        waiting = await h.store.get("camp-second")
        assert waiting.status == "running" and waiting.pending == "deploy"
        assert waiting.reason.startswith("waits for the canary") and await h.registry.read(OTHER_KEY) is None
        assert (await canary_record(h, KEY.hardware)).waiting == ["camp-second"]

        async def second_started():
            return await h.registry.read(OTHER_KEY) is not None

        await publish_until(h, simulated_reports(KEY, first.variant_id, canary.revision, 1 / 1.1, "host:1",
                                                 seed=31, per_report=4), second_started)
        events = await deploys(h, at_least=3)
        assert [(e.campaign_id, e.stage) for e in events] == [
            ("camp-first", "canary"), ("camp-first", "promoted"), ("camp-second", "canary")]
        assert (await h.registry.read(OTHER_KEY)).entry.stage == "canary"
        record = await canary_record(h, KEY.hardware)
        assert record.campaign_id == "camp-second" and not record.done and record.waiting == []
        assert (await h.store.get("camp-second")).status == "deployed"


async def test_replicas_carrying_out_the_same_verdict_promote_once(nats_url, tmp_path):
    fast = bench(campaign_for("camp-twins"), 1024, 1.4, 1.3, round_size=1)
    async with running_deployer(nats_url, tmp_path) as h:
        await h.handled(await h.send(fast))
        canaries = await CanaryStore.open(h.broker)
        decided = {"action": "promote", "step_speedup": 1.2, "step_speedup_ci": (1.1, 1.3), "reason": "by hand"}
        run, _ = await canaries.update(KEY.hardware, lambda r: (r.model_copy(update=decided), None))
        # Three replicas at once: two here, and the service's own sweep.
        await asyncio.gather(*(settle(h.broker, h.registry, canaries, run) for _ in range(2)))
        history = await h.registry.history(KEY)
        assert [r.entry.stage for r in history] == ["canary", "promoted"], "one promote, one revision"
        await asyncio.sleep(SWEEP_S + 1)
        assert [e.stage for e in await deploys(h, at_least=2)] == ["canary", "promoted"], "one Deploy for it"
        assert (await canary_record(h, KEY.hardware)).outcome == f"promoted at revision {history[1].revision}"


async def test_canary_nobody_reports_on_is_withdrawn_at_its_time_limit(nats_url, tmp_path):
    fast = bench(campaign_for("camp-silent"), 1024, 1.4, 1.3, round_size=1)
    async with running_deployer(nats_url, tmp_path, KERNELLOOP_CANARY_MAX_S=1.0) as h:
        await h.handled(await h.send(fast))
        deadline = time.monotonic() + 15
        while await h.registry.read(KEY) is not None:  # the fallback serves again
            assert time.monotonic() < deadline, "the silent canary was not withdrawn"
            await asyncio.sleep(0.2)
        events = await deploys(h, at_least=2)
        assert [e.stage for e in events] == ["canary", "withdrawn"]
        assert events[1].variant_id == "fallback" and events[1].detail.startswith("no evidence")
        assert fast.variant_id in withdrawn(await h.registry.history(KEY))


# ---- a real workload: the SDK and its dispatch table in this process ----------------------------------


class Workload:
    """Calls `step` in a loop on its own thread, as a serving process would, until stopped."""

    def __init__(self, step):
        self.step, self.calls, self._stop = step, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self.calls += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


@pytest.fixture
def quick_canary(monkeypatch):
    monkeypatch.setenv("KERNELLOOP_CANARY_SLOT_S", "0.25")
    monkeypatch.setenv("KERNELLOOP_REGISTRY_WAIT_S", "0")


async def test_workload_serving_a_slower_variant_has_its_canary_withdrawn(nats_url, tmp_path, quick_canary):
    # BLOCK 256 runs a 1024-wide row in four steps where the fallback (BLOCK 512) takes two: in the
    # interpreter it serves ~1.4x slower, whatever the (made-up) benchmark promised.
    slow = bench(campaign_for("camp-live-slow"), 256, 1.5, 1.4, round_size=1)
    x, w = rmsnorm.make_inputs([4, 1024], torch.float32, "cpu", seed=0)
    async with running_deployer(nats_url, tmp_path) as h:
        runtime = observe(nats_url, hardware=HARDWARE.key, window_s=1.0, sample_every=2, state_dir=tmp_path)
        try:
            with Workload(lambda: ops.rmsnorm(x, w)):
                await h.handled(await h.send(slow))
                await wait_for(lambda: any(d.stage == "canary" for d in runtime.deploys), 20, "no canary swapped in")
                await wait_for(lambda: runtime.withdrawals, 60, "the canary was not withdrawn")
            (withdrawal,) = runtime.withdrawals
            assert withdrawal.variant_id == slow.variant_id and withdrawal.replaced_by is None
            assert runtime.serving("rmsnorm", "float32", KEY.bucket) is None and not runtime.canaries
            assert runtime.canary_reports_sent > 0
        finally:
            runtime.close()
        assert await h.registry.read(KEY) is None
        record = await canary_record(h, KEY.hardware)
        assert record.action == "withdraw" and record.step_speedup < 1, record.reason
        assert set(record.measures.values()) == {"key"} and record.judged_windows >= 6
        assert slow.variant_id in withdrawn(await h.registry.history(KEY))


class Norm(torch.nn.Module):
    """A model whose step is an RMSNorm through kernelloop's op."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rmsnorm(x, self.weight)


async def test_observed_model_promotes_a_faster_variant_on_its_step_time(nats_url, tmp_path, quick_canary):
    fast = bench(campaign_for("camp-live-fast"), 1024, 2.5, 2.3, round_size=1)  # ~2.6x in the interpreter
    x, w = rmsnorm.make_inputs([4, 1024], torch.float32, "cpu", seed=0)
    model = Norm(w)
    async with running_deployer(nats_url, tmp_path) as h:
        runtime = observe(nats_url, hardware=HARDWARE.key, window_s=1.0, state_dir=tmp_path)
        sampler = observe(model, every=10_000)  # shares the runtime: the canaries measure its steps now
        try:
            with Workload(lambda: model(x)):
                await h.handled(await h.send(fast))
                await wait_for(lambda: any(d.stage == "promoted" for d in runtime.deploys), 60,
                               "the canary was not promoted")
            assert runtime.serving("rmsnorm", "float32", KEY.bucket) == fast.variant_id and not runtime.canaries
            assert runtime.withdrawals == []
        finally:
            sampler.close()
            runtime.close()
        record = await canary_record(h, KEY.hardware)
        assert record.action == "promote" and record.step_speedup > 1.5, record.reason
        assert set(record.measures.values()) == {"step"}
        assert {w.step_kind for ws in record.windows.values() for w in ws} == {"input:4x1024"}
        assert (await h.registry.read(KEY)).entry.stage == "promoted"
