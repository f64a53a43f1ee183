"""The sampling observer: a model or step function runs as it is, and the PyTorch profiler records a
few steps in many (shapes included). Each recorded range becomes kernel.stats
(observer/ingest/stats.py), published through the observing runtime with its next window.

    sampler = Sampler(model, runtime.submit, hardware, source, every=1000, active=1)
    model(x)            # every 1000th step is profiled; conversion runs on a worker thread
    sampler.close()     # the range being recorded, if any, is converted and handed over
"""
import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile

from observer.ingest.stats import stats_from_profiler_trace
from shared.schemas import KernelStats

log = logging.getLogger("kernelloop.observer")


def profiler_schedule(every: int, active: int) -> Callable[[int], ProfilerAction]:
    """Step index -> what the profiler does in that step: `active` recorded steps in every `every`,
    after one warm-up step (the profiler's start-up falls there, not in the first recorded step),
    the first cycle waiting too, so the model's first calls (loading, compiling) are not the
    sample. torch.profiler.schedule's semantics, kept here because torch's profile object, held
    between ranges, adds a cost to every step."""
    if active < 1 or every <= active:
        raise ValueError(f"profiling needs 1 <= active < every, got active={active}, every={every}")
    first = every - active  # the first recorded position in a cycle; the warm-up is just before

    def action(step: int) -> ProfilerAction:
        position = step % every
        if position < first - 1:
            return ProfilerAction.NONE
        if position == first - 1:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD_AND_SAVE if position == every - 1 else ProfilerAction.RECORD

    return action


def without_dispatched(trace: dict) -> dict:
    """The trace less kernelloop's own ops and what runs inside them: the SDK's dispatch already
    counts every call of those, so a profiled step would count them twice."""
    events = trace.get("traceEvents") or []
    spans: dict[tuple, list[tuple[float, float]]] = {}
    for e in events:
        if isinstance(e, dict) and e.get("cat") == "cpu_op" and str(e.get("name", "")).startswith("kernelloop::"):
            spans.setdefault((e.get("pid"), e.get("tid")), []).append((e["ts"], e["ts"] + e["dur"]))
    if not spans:
        return trace

    def inside(e: dict) -> bool:
        return e.get("cat") == "cpu_op" and any(start <= e["ts"] <= end for start, end in
                                                spans.get((e.get("pid"), e.get("tid")), ()))

    return trace | {"traceEvents": [e for e in events if not (isinstance(e, dict) and inside(e))]}


class Sampler:
    """Profiles `active` steps in every `every` of a model (hooked in place: one step is one
    top-level forward) or a step function (called through this object), and hands each recorded
    range's KernelStats to `submit`. Callable like its target; close() stops it."""

    def __init__(self, target: torch.nn.Module | Callable, submit: Callable[[list[KernelStats]], None],
                 hardware: str, source: str, every: int = 1000, active: int = 1,
                 on_close: Callable[[], None] | None = None):
        self.target = target
        self.hardware, self.source = hardware, source
        self.steps = 0  # steps run since observing began
        self.ranges = 0  # profiled ranges converted
        self.published = 0  # KernelStats handed to submit
        self.convert_s = 0.0  # the worker's CPU time spent reading and converting traces
        self._schedule = profiler_schedule(every, active)
        self._submit = submit
        self._on_close = on_close
        self._profiler: profile | None = None  # from a range's warm-up step to its last step
        self._recording = False
        self._depth = 0
        self._lock = threading.Lock()
        self._closed = False
        self._dir = tempfile.mkdtemp(prefix="kernelloop-sampler-")
        # one worker: traces convert in order, off the workload's thread
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernelloop-sampler")
        self._handles = []
        if isinstance(target, torch.nn.Module):
            self._handles = [target.register_forward_pre_hook(lambda *_: self._begin()),
                             target.register_forward_hook(lambda *_: self._end(), always_call=True)]
        else:
            functools.update_wrapper(self, target)

    @property
    def closed(self) -> bool:
        return self._closed

    def __call__(self, *args, **kwargs):
        if isinstance(self.target, torch.nn.Module):
            return self.target(*args, **kwargs)  # the hooks count the step
        self._begin()
        try:
            return self.target(*args, **kwargs)
        finally:
            self._end()

    def _begin(self) -> None:
        self._depth += 1
        if self._depth > 1 or self._closed:
            return
        action = self._schedule(self.steps)
        if action is ProfilerAction.NONE:
            return  # the common case: nothing but this check
        if self._profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._profiler = profile(activities=activities, record_shapes=True)
            self._profiler.prepare_trace()
        if action is not ProfilerAction.WARMUP and not self._recording:
            self._profiler.start_trace()
            self._recording = True

    def _end(self) -> None:
        self._depth -= 1
        if self._depth or self._closed:
            return
        action = self._schedule(self.steps)
        self.steps += 1
        if action is ProfilerAction.RECORD_AND_SAVE:
            self._save()

    def _save(self) -> None:
        """Stop recording; the export needs the profiler's results, so it runs on this thread, and
        parsing and conversion go to the worker. A fresh profiler serves the next range."""
        prof, recording = self._profiler, self._recording
        self._profiler, self._recording = None, False
        if prof is None or not recording:
            return
        path = os.path.join(self._dir, f"trace-{self.steps}.json")
        try:
            prof.stop_trace()
            prof.export_chrome_trace(path)
        except Exception:
            log.exception("sampling: exporting a profiled range failed; it is skipped")
            return
        self._worker.submit(self._convert, path)

    def _convert(self, path: str) -> None:
        start = time.thread_time()
        try:
            with open(path) as f:
                trace = json.load(f)
            stats = stats_from_profiler_trace(without_dispatched(trace), self.hardware, self.source)
        except Exception:
            log.exception("sampling: converting a profiled range failed; it is skipped")
            return
        finally:
            os.unlink(path)
            self.convert_s += time.thread_time() - start
        self.ranges += 1
        if stats:
            self._submit(stats)
            self.published += len(stats)

    def close(self) -> None:
        """Stop profiling and remove the hooks; a range being recorded is converted and handed
        over before this returns, then on_close runs (the runtime publishes and stops)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for handle in self._handles:
            handle.remove()
        if self._recording:
            self._save()
        elif self._profiler is not None:  # warmed up, never started: nothing to stop
            self._profiler = None
        self._worker.shutdown(wait=True)
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._on_close is not None:
            self._on_close()
