"""What a workload imports: `ops` (each catalog op as a PyTorch custom op, dispatched per shape
bucket to the deployed variant or the op's fallback), `observe()` to publish usage and follow the
registry, and `patch(model)` / `unpatch(model)` for models whose building blocks do not call the ops
(observer/patching.py).

    runtime = observe()                  # background thread; the workload never waits on it
    y = ops.rmsnorm(x, weight)           # x: [..., hidden]; every op of shared.ops.CATALOG likewise
    runtime.close()                      # publishes the last window

    sampler = observe(model)             # besides, 1 step in 1000 profiled and published (sampling.py)
"""
import atexit
import inspect
import logging
import os
import socket
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.autograd.profiler as _profiler

from observer.dispatch import Dispatcher
from observer.hotswap import DeployRecord
from observer.runtime import Runtime
from observer.sampling import Sampler, profiler_schedule
from shared.ops import CATALOG
from shared.settings import Settings

log = logging.getLogger("kernelloop.observer")

__all__ = ["ops", "observe", "patch", "unpatch", "patched", "PatchReport", "Runtime", "Sampler", "DeployRecord"]

# One table per process: every call of an op, compiled or not, dispatches through it.
_dispatcher = Dispatcher()
_runtime: Runtime | None = None


def _register(op: ModuleType):
    """The op as kernelloop::<name>, a PyTorch custom op whose schema is its reference's signature.
    A custom op is opaque to torch.compile: the graph keeps one call, and the dispatch (and with it
    the hot swap) happens inside it at run time. Its fake (shape) implementation is the reference
    itself, run on fake tensors, so outputs' shapes and dtypes cannot drift from the reference's."""
    name, signature = op.NAME, inspect.signature(op.reference)

    def impl(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()  # the dispatcher and the launchers take positional arguments
        return _dispatcher.call(name, *bound.args)

    impl.__signature__ = signature  # read by torch's schema inference
    impl.__name__ = name
    custom = torch.library.custom_op(f"kernelloop::{name}", impl, mutates_args=())
    custom.register_fake(op.reference)
    n_params = len(signature.parameters)
    dispatch = _dispatcher.call

    def call(*args, **kwargs):
        # Under torch.compile the graph gets the custom op, one opaque node; under the profiler the
        # trace shows it as kernelloop::<name> (observer/ingest.py reads such traces). Otherwise
        # (CUDA graph capture included) the torch dispatcher's trip through the custom op costs the
        # host tens of microseconds per call for nothing: the call goes to kernelloop's dispatch.
        if torch.compiler.is_compiling() or _profiler._is_profiler_enabled:
            return custom(*args, **kwargs)
        if kwargs or len(args) != n_params:
            return impl(*args, **kwargs)
        return dispatch(name, *args)

    call.__signature__, call.__name__, call.__doc__ = signature, name, op.__doc__
    call.custom_op = custom  # torch.ops.kernelloop.<name> as well
    return call


def _register_user_op(op: ModuleType):
    """An op added with `kernelloop op add`: dispatched like a catalog op, per shape bucket, to its
    deployed variant or its reference. Its reference takes the Model's inputs then its parameters
    (*args), which torch.library cannot give a schema, so it is a plain function: under
    torch.compile the call is traced through (a graph break) rather than kept as one node."""
    name, dispatch = op.NAME, _dispatcher.call

    def call(*args):
        return dispatch(name, *args)

    call.__name__, call.__doc__ = name, op.__doc__
    return call


class _Ops:
    """The catalog's ops, one attribute each (ops.rmsnorm, ops.matmul, ...), and ops added with
    `kernelloop op add` (found in the state folder on first use); forward only (inference)."""

    def __init__(self):
        for name, op in CATALOG.items():
            setattr(self, name, _register(op))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        from shared.ops.kernelbench import find_user_op

        try:
            op = find_user_op(name)
        except KeyError as e:  # its file was edited by hand and no longer loads
            raise AttributeError(str(e)) from None
        if op is None:
            raise AttributeError(f"kernelloop.ops has no op {name!r}: the catalog has {', '.join(sorted(CATALOG))}; "
                                 f"add one with `kernelloop op add FILE` (KernelBench format)")
        call = _register_user_op(op)
        setattr(self, name, call)
        return call

    def __dir__(self):
        from shared.ops.kernelbench import user_op_names

        return sorted(CATALOG) + sorted(set(user_op_names()) - set(CATALOG))


ops = _Ops()


def observe(target: torch.nn.Module | Callable | str | None = None, nats_url: str | None = None,
            hardware: str | None = None, window_s: float | None = None, sample_every: int | None = None,
            state_dir: Path | str | None = None, *, every: int | None = None,
            active: int | None = None) -> Runtime | Sampler:
    """Start publishing kernel.stats and following the registry; arguments left out come from the
    environment (shared.settings). One runtime per process: close() it before observing again.

    observe() or observe(nats_url): the ops' calls are published; returns the Runtime.
    observe(model) or observe(step_fn): besides, the PyTorch profiler records `active` steps in
    every `every` (KERNELLOOP_PROFILE_ACTIVE, KERNELLOOP_PROFILE_EVERY: 1 in 1000) and what they ran
    is published too; nothing else of the serving code changes. A model is hooked in place (a step
    is one top-level forward); a step function is called through the returned Sampler. The Sampler
    is callable as its target; its close() stops sampling and the runtime it started (a runtime
    already running is shared and left running)."""
    if target is None or isinstance(target, str):
        return _start_runtime(target or nats_url, hardware, window_s, sample_every, state_dir)
    if not callable(target):
        raise TypeError(f"observe() takes a model, a step function or a NATS URL, not {type(target).__name__}")
    settings = Settings()
    every, active = every or settings.profile_every, active or settings.profile_active
    profiler_schedule(every, active)  # refuses a bad rate before anything starts
    owned = _runtime is None or _runtime.closed
    runtime = _start_runtime(nats_url, hardware, window_s, sample_every, state_dir) if owned else _runtime
    sampler = Sampler(target, runtime.submit, _dispatcher.hardware, runtime.windows.source, every=every,
                      active=active, on_close=runtime.close if owned else None)
    atexit.register(sampler.close)  # runs before the runtime's close: its last range is published
    return sampler


def _start_runtime(nats_url: str | None, hardware: str | None, window_s: float | None, sample_every: int | None,
                   state_dir: Path | str | None) -> Runtime:
    global _runtime
    if _runtime is not None and not _runtime.closed:
        raise RuntimeError("this process is already observed; close() the runtime first")
    settings = Settings()
    if hardware:
        _dispatcher.hardware = hardware
    _dispatcher.sample_every = max(1, sample_every or settings.sample_every)
    runtime = Runtime(
        _dispatcher,
        nats_url=nats_url or settings.nats_url,
        source=f"{socket.gethostname()}:{os.getpid()}",
        window_s=window_s or settings.window_s,
        state_dir=Path(state_dir or settings.state_dir),
        replicas=settings.nats_replicas,
    )
    _runtime = runtime.start()
    atexit.register(runtime.close)  # the last window is worth a short wait at exit
    # The registry is the persistent tuning cache: a restarted process serves what is deployed from
    # its first calls, once the current entries are loaded. Without NATS it serves the fallbacks.
    if settings.registry_wait_s > 0 and not runtime.registry_synced.wait(settings.registry_wait_s):
        log.warning("kernelloop: the registry did not answer within %g s (KERNELLOOP_REGISTRY_WAIT_S): the ops "
                    "serve their fallbacks until it does, then deployed variants swap in", settings.registry_wait_s)
    return runtime


# after ops: patching binds to them when it patches
from observer.patching import PatchReport, patch, patched, unpatch  # noqa: E402
