"""The step clock of observe(model): each top-level forward is one step, tagged with its kind, and
timed from its start to the next step's start, for the canaries' step measure (observer/sdk/canary.py).

Why start to next start: it is the serving period, read on the host without a device sync. On CUDA
a forward returns once its kernels are queued, so its own start-to-end time is launch time only
(unless we synchronised, which would cost the workload what we set out to measure); a serving loop
waits on the device once per step anyway (to read the sampled token), so in steady state the period
between two step starts is the device's step time plus the host's own work. What runs between
steps (sampling, scheduling, an idle gap) runs alike under both arms and only adds noise, which the
per-window medians and the trimmed mean over windows absorb.

    clock = StepClock(runtime.canary)
    model = clock.attach(model)      # a module is hooked in place; a step function is wrapped
    clock.close()
"""
import functools
import time
from typing import Callable

import torch

from observer.sdk.canary import CanaryController


def _bucket(n: int) -> int:
    """The next power of two: a few kinds, each with enough windows, instead of one per batch size."""
    return 1 << max(0, n - 1).bit_length()


def step_kind(args: tuple, kwargs: dict) -> str:
    """The kind of a step from its first tensor argument: token ids [batch, seq] or embeddings
    [batch, seq, hidden] give "decode:b<batch>" for one token a sequence, else "prefill:n<tokens>"
    (powers of two); any other input gives its shape ("input:8x3x224x224"); no tensor, "step"."""
    x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if x is None:
        return "step"
    if (x.dim() == 2 and not x.is_floating_point()) or x.dim() == 3:
        batch, seq = x.shape[0], x.shape[1]
        return f"decode:b{_bucket(batch)}" if seq == 1 else f"prefill:n{_bucket(batch * seq)}"
    return "input:" + "x".join(str(d) for d in x.shape)


class StepClock:
    """Tells the canaries when each step of one model or step function starts, and its kind."""

    def __init__(self, canary: CanaryController, clock: Callable[[], float] = time.perf_counter):
        self.canary = canary
        self.clock = clock
        self._handle = None
        self._depth = 0  # a step function that calls itself is one step
        self._closed = False
        canary.attach_clock()

    def attach(self, target: torch.nn.Module | Callable) -> torch.nn.Module | Callable:
        """Hook a module's forward (returned as it is) or wrap a step function (returned wrapped)."""
        if isinstance(target, torch.nn.Module):
            self._handle = target.register_forward_pre_hook(self._pre, with_kwargs=True)
            return target

        @functools.wraps(target)
        def stepped(*args, **kwargs):
            if self._depth == 0:
                self._started(args, kwargs)
            self._depth += 1
            try:
                return target(*args, **kwargs)
            finally:
                self._depth -= 1

        return stepped

    def _pre(self, module, args, kwargs) -> None:
        self._started(args, kwargs)

    def _started(self, args: tuple, kwargs: dict) -> None:
        if not self._closed:
            self.canary.step(step_kind(args, kwargs), self.clock())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._handle is not None:
            self._handle.remove()
        self.canary.detach_clock()
