"""What a workload imports: `ops` (each catalog op as a PyTorch custom op, dispatched per shape
bucket to the deployed variant or the op's fallback), `observe()` to publish usage and follow the
registry, and `patch(model)` / `unpatch(model)` for models whose building blocks do not call the ops
(observer/sdk/patching.py). The ops themselves are made in observer/sdk/customops.py.

    runtime = observe()                  # background thread; the workload never waits on it
    y = ops.rmsnorm(x, weight)           # x: [..., hidden]; every op of shared.ops.CATALOG likewise
    runtime.close()                      # publishes the last window

    sampler = observe(model)             # besides, 1 step in 1000 profiled and published (sampling.py)
"""
import atexit
import logging
import os
import socket
from pathlib import Path
from typing import Callable

import torch

from observer.sdk.customops import dispatcher, ops
from observer.sdk.hotswap import DeployRecord
from observer.sdk.patching import PatchReport, patch, patched, unpatch
from observer.sdk.runtime import Runtime
from observer.sdk.sampling import Sampler, profiler_schedule
from observer.sdk.steps import StepClock
from shared.settings import Settings

log = logging.getLogger("kernelloop.observer")

__all__ = ["ops", "observe", "patch", "unpatch", "patched", "PatchReport", "Runtime", "Sampler", "DeployRecord"]

_runtime: Runtime | None = None


def observe(target: torch.nn.Module | Callable | str | None = None, nats_url: str | None = None,
            hardware: str | None = None, window_s: float | None = None, sample_every: int | None = None,
            state_dir: Path | str | None = None, *, every: int | None = None,
            active: int | None = None, canary_slot_s: float | None = None) -> Runtime | Sampler:
    """Start publishing kernel.stats and following the registry; arguments left out come from the
    environment (shared.settings). One runtime per process: close() it before observing again.

    observe() or observe(nats_url): the ops' calls are published; returns the Runtime.
    observe(model) or observe(step_fn): besides, the PyTorch profiler records `active` steps in
    every `every` (KERNELLOOP_PROFILE_ACTIVE, KERNELLOOP_PROFILE_EVERY: 1 in 1000) and what they ran
    is published too, and canaries measure the model's step time (observer/sdk/steps.py) instead
    of the key's time per call; nothing else of the serving code changes. A model is hooked in
    place (a step is one top-level forward); a step function is called through the returned
    Sampler. The Sampler is callable as its target; its close() stops sampling and the runtime it
    started (a runtime already running is shared and left running)."""
    if target is None or isinstance(target, str):
        return _start_runtime(target or nats_url, hardware, window_s, sample_every, state_dir, canary_slot_s)
    if not callable(target):
        raise TypeError(f"observe() takes a model, a step function or a NATS URL, not {type(target).__name__}")
    settings = Settings()
    every, active = every or settings.profile_every, active or settings.profile_active
    profiler_schedule(every, active)  # refuses a bad rate before anything starts
    owned = _runtime is None or _runtime.closed
    runtime = (_start_runtime(nats_url, hardware, window_s, sample_every, state_dir, canary_slot_s) if owned
               else _runtime)
    clock = StepClock(runtime.canary)

    def closed() -> None:
        clock.close()
        if owned:
            runtime.close()

    sampler = Sampler(clock.attach(target), runtime.submit, dispatcher.hardware, runtime.windows.source,
                      every=every, active=active, on_close=closed)
    atexit.register(sampler.close)  # runs before the runtime's close: its last range is published
    return sampler


def _start_runtime(nats_url: str | None, hardware: str | None, window_s: float | None, sample_every: int | None,
                   state_dir: Path | str | None, canary_slot_s: float | None = None) -> Runtime:
    global _runtime
    if _runtime is not None and not _runtime.closed:
        raise RuntimeError("this process is already observed; close() the runtime first")
    settings = Settings()
    if hardware:
        dispatcher.hardware = hardware
    dispatcher.sample_every = max(1, sample_every or settings.sample_every)
    runtime = Runtime(
        dispatcher,
        nats_url=nats_url or settings.nats_url,
        source=f"{socket.gethostname()}:{os.getpid()}",
        window_s=window_s or settings.window_s,
        state_dir=Path(state_dir or settings.state_dir),
        replicas=settings.nats_replicas,
        canary_slot_s=canary_slot_s or settings.canary_slot_s,
    )
    _runtime = runtime.start()
    atexit.register(runtime.close)  # the last window is worth a short wait at exit
    # The registry is the persistent tuning cache: a restarted process serves what is deployed from
    # its first calls, once the current entries are loaded. Without NATS it serves the fallbacks.
    if settings.registry_wait_s > 0 and not runtime.registry_synced.wait(settings.registry_wait_s):
        log.warning("kernelloop: the registry did not answer within %g s (KERNELLOOP_REGISTRY_WAIT_S): the ops "
                    "serve their fallbacks until it does, then deployed variants swap in", settings.registry_wait_s)
    return runtime
