"""Per-call dispatch of a catalog op: the variant the registry names for the call's kernel key, else
the op's fallback; and sampled timing of the calls for the current window."""
import logging
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from shared import hardware
from shared.ops import DTYPES, get_op
from shared.schemas import RegistryEntry
from shared.variants import load, render, static_problems, variant_id
from shared.windows import WindowAggregator

log = logging.getLogger("kernelloop.observer")

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Served:
    """A deployed variant in the dispatch table."""

    variant_id: str
    launch: Callable
    entry: RegistryEntry


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
    """The dispatch table (kernel key -> Served) and the timing of sampled calls.

    The table is swapped one key at a time by plain dict assignment, atomic under the GIL, so a
    call sees either the old or the new launcher, never a mix."""

    def __init__(self, cache_dir: Path | None = None):
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "kernelloop-variants"
        self.table: dict[str, Served] = {}
        self.windows: WindowAggregator | None = None  # set while a runtime observes
        self.sample_every = 8
        self._hardware: str | None = None
        self._interpreted: bool | None = None
        self._calls: dict[str, int] = {}
        self._fallbacks: dict[str, Callable] = {}
        self._shape_fns: dict[str, Callable] = {}  # op -> the op's shape of a call's arguments
        self._resolved: dict[tuple, tuple] = {}  # call signature -> (dtype, shape, bucket, key)
        self._load_lock = threading.Lock()
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
        self._resolved = {}  # resolved keys name the hardware

    def key(self, op_name: str, dtype: str, bucket: str) -> str:
        return f"{self.hardware}.{op_name}.{dtype}.{bucket}"

    def fallback(self, op_name: str, device_type: str) -> Callable:
        """The torch reference; on a machine without CUDA, the op's baseline Triton kernel in the
        interpreter, since only interpreted code compares with interpreted variants."""
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

    def call(self, op_name: str, *args):
        x = args[0]  # the activation: its shape and dtype pick the kernel key
        # the key of a call depends only on its tensors' shapes and x's dtype: resolved once per
        # signature, since a model repeats a few shapes and the host path is per call
        signature = (op_name, x.dtype, *[a.shape for a in args if isinstance(a, torch.Tensor)])
        resolved = self._resolved.get(signature)
        if resolved is None:
            resolved = self._resolve(op_name, x, args)
            if len(self._resolved) < 4096:
                self._resolved[signature] = resolved
        dtype, shape, bucket, key = resolved
        if dtype is None:  # no kernel key for this dtype: nothing deployed can serve it
            return get_op(op_name).reference(*args)
        served = self.table.get(key)
        windows = self.windows
        if windows is None:
            return self._launch(key, served, op_name, x, args)

        count = self._calls.get(key, 0) + 1
        self._calls[key] = count  # a lost increment between threads only shifts the sampling
        variant = served.variant_id if served else None
        # the first call of a key is never sampled: it may pay for loading or compiling; and
        # events cannot be timed inside a CUDA graph capture
        if count % self.sample_every or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            y = self._launch(key, served, op_name, x, args)
            windows.record(op_name, dtype, bucket, shape, variant)
        elif x.is_cuda:
            # events queue behind the launch; reading them waits for the flush, off this path
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = self._launch(key, served, op_name, x, args)
            end.record()
            windows.record(op_name, dtype, bucket, shape, variant)
            self._pending.append((op_name, dtype, bucket, variant, start, end))
        else:
            # the CPU (and the interpreter) is synchronous: the wall clock is the call's time
            t0 = time.perf_counter()
            y = self._launch(key, served, op_name, x, args)
            windows.record(op_name, dtype, bucket, shape, variant, (time.perf_counter() - t0) * 1e6)
        return y

    def _resolve(self, op_name: str, x: torch.Tensor, args: tuple) -> tuple:
        dtype = _DTYPE_NAMES.get(x.dtype)
        if dtype is None:
            return None, None, None, None
        shape, bucket = self._shape_and_bucket(op_name, args)
        return dtype, shape, bucket, self.key(op_name, dtype, bucket)

    def _shape_and_bucket(self, op_name: str, args: tuple) -> tuple[list[int], str]:
        fn = self._shape_fns.get(op_name)
        if fn is None:
            op = get_op(op_name)
            shape_of = getattr(op, "op_shape", None) or (lambda x, *rest: list(x.shape))
            bucket_of = op.shape_bucket

            def fn(*call_args):
                shape = shape_of(*call_args)
                return shape, bucket_of(shape)

            self._shape_fns[op_name] = fn
        return fn(*args)

    def _launch(self, key: str, served: Served | None, op_name: str, x: torch.Tensor, args: tuple):
        if served is None:
            y = self.fallback(op_name, x.device.type)(*args)
        else:
            try:
                y = served.launch(*args)
            except Exception:
                # Raises again when the input, not the variant, is at fault: then the variant stays.
                y = self.fallback(op_name, x.device.type)(*args)
                # a deployed variant must never take the workload down: back to the fallback
                log.exception("variant %s failed on %s %s; the fallback serves %s from now on",
                              served.variant_id, key, list(x.shape), key)
                if self.table.get(key) is served:
                    self.table.pop(key, None)
        if isinstance(y, tuple):  # ops such as rmsnorm_residual return (y, residual)
            return tuple(t if t.is_contiguous() else t.contiguous() for t in y)
        return y if y.is_contiguous() else y.contiguous()

    def resolve_timings(self) -> None:
        """Move finished device timings into the window; unfinished ones wait for the next flush."""
        windows = self.windows
        while self._pending:
            op_name, dtype, bucket, variant, start, end = self._pending[0]
            if not end.query():
                break
            self._pending.popleft()
            if windows is not None:
                windows.add_sample(op_name, dtype, bucket, variant, start.elapsed_time(end) * 1e3)

    def install(self, key: str, served: Served) -> None:
        self.table[key] = served

    def remove(self, key: str) -> None:
        self.table.pop(key, None)

    def serving(self, key: str) -> str | None:
        served = self.table.get(key)
        return served.variant_id if served else None
