"""The sampling observer against a real nats-server: while a loop of model steps runs, its profiled
steps reach kernel.stats with the model's ops and shapes; close() publishes what is pending and
leaves no thread behind."""
import asyncio
import threading
import time

import nats
import pytest
import torch

from observer.sdk import observe
from shared import subjects
from shared.broker import STREAM_CONFIG
from shared.schemas import KernelStats

pytestmark = pytest.mark.nats

HW = "cpu-interpreter"
KEYS = {f"{HW}.rmsnorm.float32.h64-r16", f"{HW}.softmax.float32.n64-r16"}


class Model(torch.nn.Module):
    """A model that calls no kernelloop op: only the profiler can see its norm and softmax."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)
        self.norm = torch.nn.RMSNorm(64)
        self.probs = torch.nn.Softmax(dim=-1)

    def forward(self, x):
        return self.probs(self.norm(self.proj(x)))


async def _fetch(sub, until, timeout: float) -> list[KernelStats]:
    got, deadline = [], time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(10, timeout=0.5)
        except nats.errors.TimeoutError:
            continue
        for m in msgs:
            await m.ack()
        got += [KernelStats.model_validate_json(m.data) for m in msgs]
    return got


def _observer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kernelloop")]


@torch.no_grad()
def _serve(model, x, stop: threading.Event, steps: list[int]) -> None:
    while not stop.is_set():
        model(x)  # the serving code, unchanged: observe() hooked the model
        steps[0] += 1
        time.sleep(0.005)


async def test_profiled_steps_are_published_while_the_model_serves_and_close_stops_cleanly(nats_url, tmp_path):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(**STREAM_CONFIG)
    sub = await js.pull_subscribe(subjects.KERNEL_STATS, durable="test-sampling", stream=subjects.STREAM_NAME)
    model, x = Model().eval(), torch.randn(6, 64)
    sampler = observe(model, nats_url=nats_url, hardware=HW, window_s=0.3, state_dir=tmp_path, every=5, active=1)
    stop, steps = threading.Event(), [0]
    loop = threading.Thread(target=_serve, args=(model, x, stop, steps), name="serving-loop")
    loop.start()
    try:
        # two profiled ranges' worth of windows, each naming both ops, while the loop goes on
        seen = await _fetch(sub, lambda got: sum(s.calls for s in got if s.key.op == "rmsnorm") >= 2, timeout=60)
        assert loop.is_alive() and not stop.is_set()
    finally:
        stop.set()
        await asyncio.to_thread(loop.join, 30)
        await asyncio.to_thread(sampler.close)
    try:
        rest = await _fetch(sub, lambda got: len(seen) + len(got) >= sampler.published, timeout=20)
    finally:
        await nc.close()

    ours = [s for s in seen if str(s.key) in KEYS]  # the projection may come as matmul too
    assert {str(s.key) for s in ours} == KEYS
    assert all(s.shapes[0].shape == [6, 64] and s.source == sampler.source for s in ours)
    assert len(seen) + len(rest) == sampler.published, "close() publishes every range it converted"
    # one profiled step in five, the model calls each op once a step
    profiled = sum(s.calls for s in seen + rest if s.key.op == "rmsnorm")
    assert 1 <= profiled <= sampler.steps // 5 + 1 and sampler.steps == steps[0]
    assert not _observer_threads(), "the sampler's worker and the runtime's thread are gone"
    assert not model._forward_pre_hooks and not model._forward_hooks
    model(x)  # served as before, unobserved
    assert sampler.steps == steps[0]


def test_a_step_function_is_wrapped_and_a_rate_that_cannot_be_kept_is_refused(tmp_path):
    calls = []

    def step(n):
        """One step of serving."""
        calls.append(n)
        return torch.softmax(torch.randn(3, 64), -1)

    with pytest.raises(ValueError, match="active < every"):
        observe(step, nats_url="nats://127.0.0.1:1", every=2, active=2)
    assert not _observer_threads(), "a refused rate starts nothing"
    sampled = observe(step, nats_url="nats://127.0.0.1:1", hardware=HW, state_dir=tmp_path, every=3, active=1)
    try:
        for n in range(7):
            sampled(n)
        assert calls == list(range(7)) and sampled.steps == 7 and sampled.__doc__ == step.__doc__
    finally:
        sampled.close()  # no server: the runtime gives up on its windows after its short wait
    assert sampled.published >= 2 and not _observer_threads()
