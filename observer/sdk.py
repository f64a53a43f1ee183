"""What a workload imports: `ops` (each catalog op as a PyTorch custom op, dispatched per shape
bucket to the deployed variant or the op's fallback), `observe()` to publish usage and follow the
registry, and `patch(model)` for models whose RMSNorm modules do not call the ops.

    runtime = observe()                  # background thread; the workload never waits on it
    y = ops.rmsnorm(x, weight)           # x: [..., hidden]; every op of shared.ops.CATALOG likewise
    runtime.close()                      # publishes the last window
"""
import atexit
import inspect
import logging
import os
import socket
from pathlib import Path
from types import ModuleType

import torch
import torch.autograd.profiler as _profiler

from observer.dispatch import Dispatcher
from observer.hotswap import DeployRecord
from observer.runtime import Runtime
from shared.ops import CATALOG, get_op
from shared.settings import Settings

log = logging.getLogger("kernelloop.observer")

__all__ = ["ops", "observe", "patch", "Runtime", "DeployRecord"]

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


class _Ops:
    """The catalog's ops, one attribute each (ops.rmsnorm, ops.matmul, ...); forward only (inference)."""

    def __init__(self):
        for name, op in CATALOG.items():
            setattr(self, name, _register(op))

    def __dir__(self):
        return sorted(CATALOG)


ops = _Ops()


def observe(nats_url: str | None = None, hardware: str | None = None, window_s: float | None = None,
            sample_every: int | None = None, state_dir: Path | str | None = None) -> Runtime:
    """Start publishing kernel.stats and following the registry; arguments left out come from the
    environment (shared.settings). One runtime per process: close() it before observing again."""
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
    )
    _runtime = runtime.start()
    atexit.register(runtime.close)  # the last window is worth a short wait at exit
    return runtime


class _PatchedRMSNorm(torch.nn.Module):
    """Stands in for an RMSNorm module, sharing its weight (state dict keys stay the same)."""

    def __init__(self, weight: torch.nn.Parameter, eps: float | None):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # nn.RMSNorm's default
        return ops.rmsnorm(x, self.weight, eps)


def _patchable(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.RMSNorm):
        return module.weight is not None and len(module.normalized_shape) == 1
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 1 and (hasattr(module, "eps") or hasattr(module, "variance_epsilon")))


@torch.no_grad()
def _agrees(module: torch.nn.Module, patched: _PatchedRMSNorm) -> bool:
    """Whether a look-alike class computes plain RMSNorm: some scale by (1 + weight), for one."""
    weight = patched.weight
    try:
        probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0))
        probe = probe.to(weight.device, weight.dtype)  # probe: [2, hidden]
        eps = patched.eps if patched.eps is not None else torch.finfo(probe.dtype).eps
        # against the reference, not the op: a probe is no call of the workload's
        expected, got = module(probe).float(), get_op("rmsnorm").reference(probe, weight, eps).float()
    except Exception:  # e.g. weights on the meta device: what cannot be checked is not patched
        return False
    return expected.shape == got.shape and bool((expected - got).norm() <= 2e-2 * expected.norm())


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Route the model's RMSNorm modules (torch's, and *RMSNorm classes with a weight and an eps)
    through ops.rmsnorm, in place; returns the model."""
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, _PatchedRMSNorm) or not _patchable(module):
            continue
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
        patched = _PatchedRMSNorm(module.weight, eps)
        if not isinstance(module, torch.nn.RMSNorm) and not _agrees(module, patched):
            log.warning("patch: %s (%s) is not plain RMSNorm; left as it is", name, type(module).__name__)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, patched)
    return model
