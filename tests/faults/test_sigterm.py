"""SIGTERM while the benchmarker works on a variant: a benchmark may outlast any stop grace period,
so it aborts its worker and hands the variant back at once (a nak, not a wait for ack_wait), exits
cleanly, and the next benchmarker to start measures it: one result, nothing lost. (Quick handlers of
the other services are drained instead: FastStream waits up to 15 s for them.)"""
import asyncio
import signal
import time

import nats
import pytest

from shared import subjects, supervisor
from shared.ops import rmsnorm
from shared.schemas import BenchResult, Campaign, KernelKey, VariantReady, WeightedShape
from shared.variants import render, variant_id

pytestmark = [pytest.mark.e2e, pytest.mark.nats]

PARAMS = {"BLOCK": 1024, "ROWS": 2, "num_warps": 4}


def _variant() -> VariantReady:
    source = render(rmsnorm.TEMPLATE, PARAMS)
    key = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h1000-r16")
    campaign = Campaign(key=key, profile=[WeightedShape(shape=[8, 1000], weight=1.0)])
    return VariantReady(campaign=campaign, variant_id=variant_id(source, PARAMS), source=source, params=PARAMS,
                        strategy="grid", round=0, round_size=1)


async def _terminate_mid_benchmark(loop: supervisor.Loop) -> tuple:
    nc = await nats.connect(loop.nats_url)
    js = nc.jetstream()
    try:
        durable = subjects.DURABLE[subjects.VARIANT_READY]
        deadline = time.monotonic() + 60
        while True:  # the service declares the stream and its consumer as it starts
            try:
                await js.consumer_info(subjects.STREAM_NAME, durable)
                break
            except (nats.js.errors.NotFoundError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
                assert time.monotonic() < deadline and not loop.dead(), "the benchmarker did not start"
                await asyncio.sleep(0.2)
        variant = _variant()
        await js.publish(subjects.VARIANT_READY, variant.model_dump_json().encode(),
                         headers={"Nats-Msg-Id": variant.event_id})
        deadline = time.monotonic() + 120
        while (await js.consumer_info(subjects.STREAM_NAME, durable)).num_ack_pending == 0:
            assert time.monotonic() < deadline, "the benchmarker never took the variant"
            await asyncio.sleep(0.05)
        process = loop.processes["benchmarker"]
        process.send_signal(signal.SIGTERM)  # in the middle of its work on the variant
        code = await asyncio.to_thread(process.wait, 60)
        handed_back = await js.consumer_info(subjects.STREAM_NAME, durable)
        loop.restart("benchmarker")
        results = await js.pull_subscribe(subjects.BENCH_RESULT, stream=subjects.STREAM_NAME)
        got: list[BenchResult] = []
        deadline = time.monotonic() + 180
        while not got and time.monotonic() < deadline:
            try:
                got = [BenchResult.model_validate_json(m.data) for m in await results.fetch(5, timeout=2)]
            except TimeoutError:  # nats' own, or the builtin one its fetch may raise
                pass
        await asyncio.sleep(2)  # a duplicate would arrive now
        try:
            got += [BenchResult.model_validate_json(m.data) for m in await results.fetch(5, timeout=1)]
        except TimeoutError:  # nats' own, or the builtin one its fetch may raise
            pass
        return got, handed_back, code, await js.consumer_info(subjects.STREAM_NAME, durable)
    finally:
        await nc.close()


def test_sigterm_hands_the_variant_in_hand_back_and_the_next_benchmarker_measures_it(nats_url, tmp_path):
    loop = supervisor.start(tmp_path, nats_url=nats_url, services=("benchmarker",),
                            env={"KERNELLOOP_BENCH_REPS": "5", "TRITON_INTERPRET": "1"})
    try:
        results, handed_back, code, drained = asyncio.run(_terminate_mid_benchmark(loop))
    finally:
        loop.stop()
    assert code == 0, f"the benchmarker exited with {code}; see {tmp_path / 'logs'}"
    assert handed_back.ack_floor.stream_seq == 0, "nothing was acked by the process that was stopped"
    assert [r.variant_id for r in results] == [_variant().variant_id] and results[0].status == "ok"
    assert drained.num_ack_pending == 0 and drained.num_pending == 0
