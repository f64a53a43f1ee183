"""PyTorch profiler traces (Chrome trace JSON, recorded with record_shapes=True) -> KernelStats, for
models that do not call kernelloop's ops: every call of a catalog op the trace shows
(observer/ingest/opmap.py says which trace ops are which), its shape, dtype and time, aggregated
over the trace as one window; and the hot ops no catalog op covers.

A call nested in a mapped call counts once (aten::linear runs aten::matmul and aten::mm inside).
Unfused patterns (HF's Llama and Gemma RMSNorm, SwiGLU, Phi-3's fused gate-up, HF's rotary) are
looked for among the sibling calls left unmapped; a pattern's time is the sum of its calls'.
Time is device time where the trace has device kernels (linked to the op that launched them by
External id), else the op's own host duration. The unmapped ops are the top-level ops of each
thread, less the time of mapped calls inside them, summed by name: where a new op would pay.
"""
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from observer.ingest.opmap import DTYPES, PATTERNS, Skip, call_of, checked_dtype, dims_of, type_of
from shared.ops import CATALOG
from shared.schemas import KernelStats, MappedOp, TraceSummary, UnmappedOp
from shared.windows import WindowAggregator

HOT_SHARE = 0.01  # unmapped ops below 1 % of the trace's op time are noise, not a campaign
HOT_TOP = 20
SKIPPED_TOP = 20  # reasons kept; a trace of a thousand odd shapes says so in one line more


@dataclass
class TraceResult:
    stats: list[KernelStats]
    mapped: list[MappedOp]
    unmapped: list[UnmappedOp]  # hot ones first, at most HOT_TOP
    skipped: list[str]  # what was left out and why, one line per reason
    total_time_us: float  # of every top-level op


@dataclass
class _Op:
    event: dict
    start: float
    end: float
    children: list["_Op"] = field(default_factory=list)
    mapped: bool = False

    @property
    def name(self) -> str:
        return str(self.event.get("name", ""))

    @property
    def args(self) -> dict:
        return self.event["args"]


def _thread(e: dict) -> tuple[str, str]:
    return str(e.get("pid")), str(e.get("tid"))


def _hashable(value) -> bool:
    return isinstance(value, (int, str))


class _Timer:
    """Time of a call: device kernels launched inside it where the trace has any, else host duration."""

    def __init__(self, spans: list[dict], cpu_ops: list[dict]):
        kernel_us: dict = defaultdict(float)  # External id -> device time of the kernels it launched
        for e in spans:
            if e.get("cat") == "kernel" and isinstance(e.get("args"), dict) and _hashable(e["args"].get("External id")):
                kernel_us[e["args"]["External id"]] += e["dur"]
        self.device = bool(kernel_us)
        self._ts: dict = defaultdict(list)
        self._sums: dict = defaultdict(lambda: [0.0])  # prefix sums of kernel time per thread, in ts order
        for e in sorted(cpu_ops, key=lambda e: e["ts"]) if self.device else []:
            thread = _thread(e)
            self._ts[thread].append(e["ts"])
            ext = e["args"].get("External id")
            self._sums[thread].append(self._sums[thread][-1] + (kernel_us.get(ext, 0.0) if _hashable(ext) else 0.0))

    def __call__(self, op: _Op, host_fallback: bool = False) -> float:
        if not self.device:
            return op.end - op.start
        thread = _thread(op.event)
        ts, sums = self._ts[thread], self._sums[thread]
        lo, hi = bisect_left(ts, op.start), bisect_right(ts, op.end)
        device = sums[hi] - sums[lo]
        return device if device or not host_fallback else op.end - op.start


def _forest(cpu_ops: list[dict]) -> list[_Op]:
    """Calls nested by time on each thread: the top-level calls, children inside."""
    roots, stacks = [], defaultdict(list)
    for e in sorted(cpu_ops, key=lambda e: (_thread(e), e["ts"], -e["dur"])):
        op = _Op(e, e["ts"], e["ts"] + e["dur"])
        stack = stacks[_thread(e)]
        while stack and op.start >= stack[-1].end:
            stack.pop()
        (stack[-1].children if stack else roots).append(op)
        stack.append(op)
    return roots


def ingest_profiler_trace(trace: dict, hardware: str, source: str) -> TraceResult:
    """Stats per (op, dtype, bucket), the hot unmapped ops and what was skipped. Raises ValueError
    only when the trace has no traceEvents list; anything else odd is skipped and said."""
    events = trace.get("traceEvents") if isinstance(trace, dict) else None
    if not isinstance(events, list):
        raise ValueError("trace.traceEvents: missing or not a list; expected a Chrome trace from torch.profiler")
    spans = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
             and isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float)) and e["dur"] >= 0]
    skipped = Counter()
    malformed = sum(1 for e in events if not isinstance(e, dict)) + sum(
        1 for e in events if isinstance(e, dict) and e.get("ph") == "X") - len(spans)
    if malformed:
        skipped[f"{malformed} trace events that are not objects or lack ts/dur"] += 1
    cpu_ops = [e for e in spans if e.get("cat") == "cpu_op" and isinstance(e.get("args"), dict)]
    timer = _Timer(spans, cpu_ops)
    roots = _forest(cpu_ops)

    base_s = trace.get("baseTimeNanoseconds", 0) / 1e9 if isinstance(trace.get("baseTimeNanoseconds"), int) else 0.0
    first = min((e["ts"] for e in spans), default=0.0)
    last = max((e["ts"] + e["dur"] for e in spans), default=0.0)
    windows = WindowAggregator(hardware, source, start=base_s + first / 1e6)
    from_names: dict[tuple, set] = defaultdict(set)
    notes: dict[str, str] = {}

    def record(op: str, shape: list[int], dtype: str, time_us: float, how: str) -> None:
        bucket = CATALOG[op].shape_bucket(shape)
        windows.record(op, dtype, bucket, shape, None, time_us)
        from_names[(op, dtype, bucket)].add(how)

    def visit(siblings: list[_Op]) -> None:
        for op in siblings:
            try:
                found = call_of(op.name, op.args)
            except Skip as e:
                skipped[f"{op.name}: {e}"] += 1
                notes.setdefault(op.name, str(e))
                found = None
            if found:
                op.mapped = True
                record(*found, timer(op, host_fallback=True), op.name)
        for i in range(len(siblings)):
            for name, match, how in PATTERNS:
                if siblings[i].mapped:
                    break
                hit = match(siblings, i)
                if hit is None or any(m.mapped for m in hit[2]):
                    continue
                shape, dtype, members = hit
                try:
                    dtype = checked_dtype(name, dtype, members[0].args)
                except Skip as e:
                    skipped[f"{how}: {e}"] += 1
                    continue
                for m in members:
                    m.mapped = True
                # device time of all the pattern's calls; views (slice, chunk) launch none and add none
                time_us = sum(timer(m) for m in members) or sum(timer(m, host_fallback=True) for m in members)
                record(name, shape, dtype, time_us, how)
        for op in siblings:
            if not op.mapped:
                visit(op.children)

    visit(roots)

    def mapped_inside(op: _Op) -> float:
        return sum(timer(c, host_fallback=True) if c.mapped else mapped_inside(c) for c in op.children)

    total = 0.0
    unmapped: dict[str, dict] = {}
    for op in roots:
        t = timer(op)
        total += t
        if op.mapped:
            continue
        row = unmapped.setdefault(op.name, {"calls": 0, "time_us": 0.0, "shapes": Counter()})
        row["calls"] += 1
        row["time_us"] += max(t - mapped_inside(op), 0.0)
        dims = (dims_of(op) or [[]])[0]  # a list of tensors (aten::cat) has no one shape
        row["shapes"][(tuple(dims) if all(type(n) is int for n in dims) else (), type_of(op.args, 0))] += 1

    stats = windows.flush(now=base_s + max(last, first + 1) / 1e6)
    share = (lambda t: t / total) if total > 0 else (lambda t: 0.0)
    mapped = sorted((MappedOp(key=s.key, calls=s.calls, time_us=s.sampled_time_us,
                              share=min(share(s.sampled_time_us), 1.0),
                              from_ops=sorted(from_names[(s.key.op, s.key.dtype, s.key.bucket)]))
                     for s in stats), key=lambda m: -m.time_us)
    hot = []
    for name, row in sorted(unmapped.items(), key=lambda kv: -kv[1]["time_us"]):
        if share(row["time_us"]) < HOT_SHARE or len(hot) == HOT_TOP:
            break
        (dims, dtype), _ = row["shapes"].most_common(1)[0]
        hot.append(UnmappedOp(name=name, calls=row["calls"], time_us=row["time_us"],
                              share=min(share(row["time_us"]), 1.0), shape=list(dims) or None,
                              dtype=DTYPES.get(dtype, dtype), note=notes.get(name, "")))
    said = [f"{what} (x{n})" if n > 1 else what for what, n in skipped.most_common(SKIPPED_TOP)]
    if len(skipped) > SKIPPED_TOP:
        said.append(f"... and {len(skipped) - SKIPPED_TOP} more kinds of skipped calls")
    return TraceResult(stats=stats, mapped=mapped, unmapped=hot, skipped=said, total_time_us=total)


def stats_from_profiler_trace(trace: dict, hardware: str, source: str) -> list[KernelStats]:
    """One KernelStats per (op, dtype, bucket) seen; every call in a trace is timed, so each is a
    sample. Raises ValueError when the trace has no traceEvents list."""
    return ingest_profiler_trace(trace, hardware, source).stats


def summarise(result: TraceResult | None, trace_id: str, hardware: str, source: str,
              error: str | None = None) -> TraceSummary:
    """What `kernelloop status` shows of a trace: a rejected one carries only its error."""
    if result is None:
        return TraceSummary(trace_id=trace_id, source=source, hardware=hardware, status="rejected", error=error)
    return TraceSummary(trace_id=trace_id, source=source, hardware=hardware,
                        status="partial" if result.skipped else "ok", total_time_us=result.total_time_us,
                        mapped=result.mapped, unmapped=result.unmapped, skipped=result.skipped)
