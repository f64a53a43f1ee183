"""Per-call dispatch of a catalog op: the variant the registry names for the call's kernel key, else
the op's fallback (for a patched block, the block's own code); and the observation of the calls for
the current window: every call counted, a few of each key timed."""
import logging
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from shared import hardware
from shared.ops import DTYPES, get_op
from shared.schemas import RegistryEntry
from shared.variants import load, render, static_problems, variant_id
from shared.windows import WindowAggregator

log = logging.getLogger("kernelloop.observer")

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# One timed call in SAMPLE_EVERY of a key, after its first ones (calls 2, 4, 8, ... up to it: a new
# key, or a new variant serving one, has a time per call within a few calls). A timed call costs the
# host its CUDA events (two, eight for an MLP less its projections), tens of µs, where a block of an
# eager decode step costs 20-100 µs: on an H200, timing 1 call in 8 made an 8B-like Llama's decode
# step 13 % slower. At 1 in 256 it is a fraction of a µs a call, and a key called a thousand times a
# second still has some 20 timed calls in each 5 s window, which is what the detector's time per call
# and its regression test read (a window without one is priced at the key's running time per call).
SAMPLE_EVERY = 256
MAX_SIGNATURES = 4096  # a workload of ever new shapes starts the table of signatures over


@dataclass(frozen=True)
class Served:
    """A deployed variant in the dispatch table."""

    variant_id: str
    launch: Callable
    entry: RegistryEntry


class _Clock:
    """A kernel key's calls by the variant serving it now, and the number of the next one to time;
    the counts of variants that served it before, kept should they serve it again (a rollback, or
    two variants serving in turns), so that only a variant new to the key has its first calls timed."""

    __slots__ = ("calls", "next", "served", "others")

    def __init__(self):
        self.calls, self.next, self.served = 0, 2, None  # the first call may pay for loading: not timed
        self.others: dict[str | None, tuple[int, int]] = {}  # variant id -> (calls, next)

    def switch(self, served: "Served | None") -> None:
        before = self.served.variant_id if self.served is not None else None
        self.others[before] = (self.calls, self.next)
        self.calls, self.next = self.others.pop(served.variant_id if served is not None else None, (0, 2))
        self.served = served

    def reset(self) -> None:
        self.calls, self.next, self.served = 0, 2, None
        self.others.clear()


class Site:
    """One call signature, resolved once: the op, the kernel key and its parts, the key's clock, and
    the untimed calls counted here since observing began (`flushed` of them already in a window)."""

    __slots__ = ("op_name", "dtype", "bucket", "shape", "key", "clock", "calls", "flushed")

    def __init__(self, op_name: str, dtype: str | None, bucket: str | None, shape: tuple, key: str | None,
                 clock: _Clock | None):
        self.op_name, self.dtype, self.bucket, self.shape = op_name, dtype, bucket, shape
        self.key, self.clock = key, clock
        self.calls = self.flushed = 0


class _Stopwatch:
    """One timed call less its parts (a patched MLP's projections, which are not the op): CUDA events,
    read when the window flushes, or the wall clock where calls are synchronous. Marks: the start,
    each part's start and end, the end."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list = []
        self.thread = threading.get_ident()

    def mark(self, *_) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def part(self, *_) -> None:
        if threading.get_ident() == self.thread:  # the same module run by another thread meanwhile
            self.mark()

    def done(self) -> bool:
        return not self.cuda or self.marks[-1].query()

    def elapsed_us(self) -> float:
        def span(a, b) -> float:
            return a.elapsed_time(b) * 1e3 if self.cuda else (b - a) * 1e6

        m = self.marks
        return max(0.0, span(m[0], m[-1]) - sum(span(m[i], m[i + 1]) for i in range(1, len(m) - 1, 2)))


def verify_and_load(entry: RegistryEntry, cache_dir: Path) -> Callable:
    """The launcher of a registry entry, only when its source hashes to the id it claims and passes
    the static checks; raises ValueError otherwise, and nothing of the source has run."""
    actual = variant_id(entry.source, entry.params)
    if actual != entry.variant_id:
        raise ValueError(f"source hashes to {actual}, not the entry's variant_id {entry.variant_id}")
    if problems := static_problems(entry.source):
        raise ValueError(f"source fails static checks: {'; '.join(problems)}")
    return load(entry.source, entry.params, entry.variant_id, cache_dir)


class Dispatcher:
    """The dispatch table (kernel key -> Served), the call signatures resolved to kernel keys, and the
    counting and timing of calls while a window is open.

    The table is swapped one key at a time by plain dict assignment, atomic under the GIL, so a
    call sees either the old or the new launcher, never a mix. Per call, the host path is one
    lookup of the call's signature, one of the table and, while observed, an increment: calls are
    counted per signature and handed to the window when it flushes (a collector), not per call."""

    def __init__(self, cache_dir: Path | None = None):
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "kernelloop-variants"
        self.table: dict[str, Served] = {}
        self._sample_every = SAMPLE_EVERY
        # call signature -> its Site (a patched rotary's: the pair for q and k; () where the op cannot serve it)
        self.sites: dict[tuple, object] = {}
        self._windows: WindowAggregator | None = None
        self._hardware: str | None = None
        self._interpreted: bool | None = None
        self._clocks: dict[str, _Clock] = {}
        self._dropped: list = []  # resolved values of signatures forgotten, counted once more, then gone
        self._fallbacks: dict[str, Callable] = {}
        self._shape_fns: dict[str, Callable] = {}  # op -> the op's shape of a call's arguments
        self._load_lock = threading.Lock()
        self._sites_lock = threading.Lock()
        # CUDA timings of sampled calls, read off the critical path when the window flushes
        self._pending: deque = deque(maxlen=4096)

    @property
    def hardware(self) -> str:
        if self._hardware is None:
            self._hardware = hardware.fingerprint().key
        return self._hardware

    @hardware.setter
    def hardware(self, key: str) -> None:
        self._hardware = key
        self._forget()  # resolved keys name the hardware

    @property
    def sample_every(self) -> int:
        """One timed call in this many of a key, after its first ones."""
        return self._sample_every

    @sample_every.setter
    def sample_every(self, every: int) -> None:
        self._sample_every = max(1, int(every))
        for clock in list(self._clocks.values()):  # a new rate: every key's count starts over
            clock.reset()

    @property
    def windows(self) -> WindowAggregator | None:
        """The open window's aggregator while a runtime observes; None otherwise."""
        return self._windows

    @windows.setter
    def windows(self, windows: WindowAggregator | None) -> None:
        old = self._windows
        if windows is old:
            return
        if old is not None:
            self._hand_over(old)  # the calls counted since its last flush are its window's
        self._windows = windows
        if windows is not None:
            windows.collect_with(self._collect)

    def key(self, op_name: str, dtype: str, bucket: str) -> str:
        return f"{self.hardware}.{op_name}.{dtype}.{bucket}"

    def fallback(self, op_name: str, device_type: str) -> Callable:
        """The op's `eager` (else its reference) on CUDA, the reference on the CPU; on a machine
        without CUDA, the op's baseline Triton kernel in the interpreter, since only interpreted
        code compares with interpreted variants."""
        if self._interpreted is None:
            self._interpreted = hardware.interpreted()
        if device_type != "cpu" or not self._interpreted:
            op = get_op(op_name)
            return getattr(op, "eager", op.reference) if device_type == "cuda" else op.reference
        launch = self._fallbacks.get(op_name)
        if launch is None:
            op = get_op(op_name)
            source = render(op.TEMPLATE, op.DEFAULT)
            with self._load_lock:
                launch = load(source, op.DEFAULT, variant_id(source, op.DEFAULT), self.cache_dir)
            self._fallbacks[op_name] = launch
        return launch

    # ---- resolving call signatures ------------------------------------------------------------------

    def resolve(self, op_name: str, dtype: torch.dtype, shape: Sequence[int]) -> Site:
        """The Site of a call of op_name on `shape` (the op's shape) in `dtype`; the caller remembers
        it under the call's signature, since a model repeats a few shapes and this path is per call."""
        shape = tuple(int(s) for s in shape)
        dtype_name = _DTYPE_NAMES.get(dtype)
        if dtype_name is None:  # no kernel key for this dtype: nothing deployed can serve it
            return Site(op_name, None, None, shape, None, None)
        bucket = get_op(op_name).shape_bucket(list(shape))
        key = self.key(op_name, dtype_name, bucket)
        clock = self._clocks.get(key)
        if clock is None:
            clock = self._clocks.setdefault(key, _Clock())
        return Site(op_name, dtype_name, bucket, shape, key, clock)

    def remember(self, signature: tuple, resolved):
        """Keep what a signature resolved to (a Site, or a tuple of them); returns it."""
        if len(self.sites) >= MAX_SIGNATURES:
            self._forget()
        self.sites[signature] = resolved
        return resolved

    def _forget(self) -> None:
        with self._sites_lock:
            if self._windows is not None:  # their counted calls still reach the next flush
                self._dropped.extend(self.sites.values())
            self.sites = {}

    # ---- calls -------------------------------------------------------------------------------------

    def call(self, op_name: str, *args):
        """One call of a catalog op: the variant deployed for its kernel key, else the op's fallback."""
        x = args[0]  # the activation: its shape and dtype pick the kernel key
        signature = (op_name, x.dtype, *[a.shape for a in args if isinstance(a, torch.Tensor)])
        site = self.sites.get(signature)
        if site is None:
            site = self.remember(signature, self.resolve(op_name, x.dtype, self._op_shape(op_name, args)))
        if site.key is None:
            return get_op(op_name).reference(*args)
        return self.serve(site, self.table.get(site.key), args)

    def serve(self, site: Site, served: Served | None, args: tuple):
        """site's call by `served` (the op's fallback where None, or should the variant fail)."""
        if self._windows is None:
            return self._launch(site, served, args)
        return self.observed(site, served, args[0], self._launch, (site, served, args))

    def observed(self, site: Site, served: Served | None, x: torch.Tensor, fn: Callable, args: tuple,
                 parts: Sequence[torch.nn.Module] = ()):
        """fn(*args) as one call of site's key served by `served` (None: a fallback), counted in the
        window, and timed when due; the time of `parts` (modules fn runs) is not the op's."""
        if self.due(site, served):
            return self.timed(site, served, x, fn, args, parts)
        return fn(*args)

    def due(self, site: Site, served: Served | None) -> bool:
        """Count one call of site's key: False when it is not to be timed (it is counted then);
        True when it is, and the caller runs it through timed(), which records it."""
        clock = site.clock
        if clock is None:
            return False
        if served is not clock.served:  # a variant swapped in or out: a new one has its first calls timed
            clock.switch(served)
        n = clock.calls = clock.calls + 1  # a lost increment between threads only shifts the sampling
        if n < clock.next:
            site.calls += 1
            return False
        every = self._sample_every
        clock.next = 2 * n if n < every else n + every
        return True

    def timed(self, site: Site, served: Served | None, x: torch.Tensor, fn: Callable, args: tuple,
              parts: Sequence[torch.nn.Module] = ()):
        """fn(*args), timed, as one call of site's key (less the time of `parts`, each run once)."""
        windows = self._windows
        # events cannot be timed inside a CUDA graph capture
        if windows is None or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            site.calls += 1
            return fn(*args)
        watch = _Stopwatch(x.is_cuda)
        hooks = [hook for part in parts for hook in (part.register_forward_pre_hook(watch.part),
                                                     part.register_forward_hook(watch.part))]
        try:
            watch.mark()
            y = fn(*args)
            watch.mark()
        finally:
            for hook in hooks:
                hook.remove()
        variant = served.variant_id if served else None
        if len(watch.marks) != 2 + 2 * len(parts):  # a part ran twice or not at all: no time to tell apart
            windows.record(site.op_name, site.dtype, site.bucket, site.shape, variant)
        elif watch.cuda:
            # events queue behind the launch; reading them waits for the flush, off this path
            windows.record(site.op_name, site.dtype, site.bucket, site.shape, variant)
            self._pending.append((site.op_name, site.dtype, site.bucket, variant, watch))
        else:
            # the CPU (and the interpreter) is synchronous: the wall clock is the call's time
            windows.record(site.op_name, site.dtype, site.bucket, site.shape, variant, watch.elapsed_us())
        return y

    def _op_shape(self, op_name: str, args: tuple) -> list[int]:
        fn = self._shape_fns.get(op_name)
        if fn is None:
            fn = self._shape_fns[op_name] = getattr(get_op(op_name), "op_shape", None) or (lambda x, *rest: x.shape)
        return fn(*args)

    def _launch(self, site: Site, served: Served | None, args: tuple):
        x = args[0]
        if served is None:
            y = self.fallback(site.op_name, x.device.type)(*args)
        else:
            try:
                y = served.launch(*args)
            except Exception:
                # Raises again when the input, not the variant, is at fault: then the variant stays.
                y = self.fallback(site.op_name, x.device.type)(*args)
                # a deployed variant must never take the workload down: back to the fallback
                log.exception("variant %s failed on %s %s; the fallback serves %s from now on",
                              served.variant_id, site.key, list(x.shape), site.key)
                if self.table.get(site.key) is served:
                    self.table.pop(site.key, None)
        if isinstance(y, tuple):  # ops such as rmsnorm_residual return (y, residual)
            return tuple(t if t.is_contiguous() else t.contiguous() for t in y)
        return y if y.is_contiguous() else y.contiguous()

    # ---- the window's side -------------------------------------------------------------------------

    def _collect(self, windows: WindowAggregator) -> None:
        """Run by the aggregator as its window closes (on the flushing thread)."""
        if windows is self._windows:
            self._hand_over(windows)

    def _hand_over(self, windows: WindowAggregator) -> None:
        """The untimed calls counted since the last hand-over, into the window."""
        with self._sites_lock:  # one hand-over at a time: a flush and a detach may race
            dropped, self._dropped = self._dropped, []
            for resolved in [*dropped, *list(self.sites.values())]:
                for site in resolved if isinstance(resolved, tuple) else (resolved,):
                    calls = site.calls
                    if calls != site.flushed and site.clock is not None:
                        served = site.clock.served  # what served the key's last call
                        windows.add_calls(site.op_name, site.dtype, site.bucket, site.shape,
                                          served.variant_id if served else None, calls - site.flushed)
                        site.flushed = calls

    def resolve_timings(self) -> None:
        """Move finished device timings into the window; unfinished ones wait for the next flush."""
        windows = self._windows
        while self._pending:
            op_name, dtype, bucket, variant, watch = self._pending[0]
            if not watch.done():
                break
            self._pending.popleft()
            if windows is not None:
                windows.add_sample(op_name, dtype, bucket, variant, watch.elapsed_us())

    def install(self, key: str, served: Served) -> None:
        self.table[key] = served

    def remove(self, key: str) -> None:
        self.table.pop(key, None)

    def serving(self, key: str) -> str | None:
        served = self.table.get(key)
        return served.variant_id if served else None
