"""PyTorch profiler traces (Chrome trace JSON, recorded with record_shapes=True) -> KernelStats,
for models that do not call kernelloop's ops: every call of a catalog op the trace shows, its
shape, dtype and time, aggregated over the trace as one window."""
import re
from collections import defaultdict

from observer.windows import WindowAggregator
from shared.ops import CATALOG
from shared.schemas import KernelStats

# The profiler's names for tensor element types.
_DTYPES = {"float": "float32", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def catalog_op(name: str) -> str | None:
    """The catalog op an event name stands for: kernelloop::rmsnorm, aten::rms_norm, MyRMSNorm...
    Ops whose shape is not their first input's (matmul's [M, N, K], see op_shape) are left out:
    the first input's dims alone would give them a wrong key."""
    if name.startswith("kernelloop::"):
        op = name.removeprefix("kernelloop::")
        return op if op in _BY_FIRST_INPUT else None
    flat = _normalise(name)
    return next((op for op in _BY_FIRST_INPUT if _normalise(op) in flat), None)


_BY_FIRST_INPUT = [name for name, op in CATALOG.items() if not hasattr(op, "op_shape")]


def _first_tensor(args: dict) -> tuple[list[int], str] | None:
    """The first input with dimensions: the activation, whose shape and dtype pick the key."""
    dims, types = args.get("Input Dims") or [], args.get("Input type") or []
    for i, d in enumerate(dims):
        if isinstance(d, list) and d and all(isinstance(n, int) and n > 0 for n in d):
            dtype = _DTYPES.get(types[i]) if i < len(types) else None
            return (d, dtype) if dtype else None
    return None


def _outermost(calls: list[dict]) -> list[dict]:
    """Drop calls nested in another call on the same thread (aten::rms_norm runs
    aten::_fused_rms_norm inside it): each call counts once."""
    kept, end_of = [], {}
    for e in sorted(calls, key=lambda e: (e.get("pid"), e.get("tid"), e["ts"], -e["dur"])):
        thread = (e.get("pid"), e.get("tid"))
        if e["ts"] < end_of.get(thread, float("-inf")):
            continue
        kept.append(e)
        end_of[thread] = e["ts"] + e["dur"]
    return kept


def _device_time_us(call: dict, cpu_ops: list[dict], kernel_us: dict) -> float | None:
    """Time of the device kernels launched inside a call (linked by External id), or None when the
    trace holds no device activity for it: then the call's own (host) duration stands."""
    start, end, thread = call["ts"], call["ts"] + call["dur"], (call.get("pid"), call.get("tid"))
    ids = {e["args"].get("External id") for e in cpu_ops
           if (e.get("pid"), e.get("tid")) == thread and start <= e["ts"] <= end}
    times = [kernel_us[i] for i in ids if i in kernel_us]
    return sum(times) if times else None


def stats_from_profiler_trace(trace: dict, hardware: str, source: str) -> list[KernelStats]:
    """One KernelStats per (op, dtype, bucket) seen; every call in a trace is timed, so each is a
    sample. Raises ValueError when the trace has no traceEvents list."""
    events = trace.get("traceEvents")
    if not isinstance(events, list):
        raise ValueError("trace.traceEvents: missing or not a list; expected a Chrome trace from torch.profiler")
    spans = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
             and isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float))]
    if not spans:
        return []
    cpu_ops = [e for e in spans if e.get("cat") == "cpu_op" and isinstance(e.get("args"), dict)]
    kernel_us: dict = defaultdict(float)  # External id -> device time of the kernels it launched
    for e in spans:
        if e.get("cat") == "kernel" and isinstance(e.get("args"), dict) and "External id" in e["args"]:
            kernel_us[e["args"]["External id"]] += e["dur"]
    calls = [e for e in cpu_ops if catalog_op(str(e.get("name", ""))) and _first_tensor(e["args"])]

    # ts is in microseconds from the trace's base time, when the exporter records one
    base_s = trace.get("baseTimeNanoseconds", 0) / 1e9
    first = min(e["ts"] for e in spans)
    last = max(e["ts"] + e["dur"] for e in spans)
    windows = WindowAggregator(hardware, source, start=base_s + first / 1e6)
    for call in _outermost(calls):
        op_name = catalog_op(call["name"])
        shape, dtype = _first_tensor(call["args"])
        bucket = CATALOG[op_name].shape_bucket(shape)
        time_us = _device_time_us(call, cpu_ops, kernel_us) if kernel_us else None
        windows.record(op_name, dtype, bucket, shape, None, time_us if time_us is not None else call["dur"])
    return windows.flush(now=base_s + max(last, first + 1) / 1e6)
