"""Message schemas: one pydantic model per subject, plus the small parts they share.

Validation only, no logic. Every event carries schema_version, event_id (also the JetStream
Nats-Msg-Id, so a re-published event is de-duplicated) and time. Units are in field names.
"""
from datetime import datetime, timezone
from typing import Any, Literal
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared import subjects

SCHEMA_VERSION = 1

Status = Literal["ok", "compile_error", "incorrect", "timeout", "crashed", "rejected"]
Reason = Literal["new_shape", "frequency_shift", "time_share_shift", "regression", "idle_to_hot", "manual"]
Strategy = Literal["baseline", "grid", "local", "evolve", "llm"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return uuid4().hex


class Model(BaseModel):
    # Unknown fields are an error: a typo in a hand-written event must not pass silently.
    model_config = ConfigDict(extra="forbid", frozen=False)


class Event(Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(default_factory=_new_id, min_length=1, max_length=128)
    time: datetime = Field(default_factory=_now)


# ---- shared parts -------------------------------------------------------------------------------

_TOKEN = r"^[A-Za-z0-9_\-]+$"  # one KV-key token: no dots, no spaces, no wildcards


class KernelKey(Model):
    """What a variant is chosen for: hardware, op, dtype and shape bucket."""

    hardware: str = Field(pattern=_TOKEN, max_length=64)
    op: str = Field(pattern=_TOKEN, max_length=64)
    dtype: Literal["float32", "float16", "bfloat16"]
    bucket: str = Field(pattern=_TOKEN, max_length=64)

    def __str__(self) -> str:
        return f"{self.hardware}.{self.op}.{self.dtype}.{self.bucket}"

    @classmethod
    def parse(cls, text: str) -> "KernelKey":
        parts = text.split(".")
        if len(parts) != 4:
            raise ValueError(f"kernel key {text!r} is not <hardware>.<op>.<dtype>.<bucket>")
        return cls(hardware=parts[0], op=parts[1], dtype=parts[2], bucket=parts[3])


class WeightedShape(Model):
    shape: list[int] = Field(min_length=1)
    weight: float = Field(gt=0, allow_inf_nan=False)

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError("every dimension must be positive")
        return v


class ShapeCount(Model):
    shape: list[int] = Field(min_length=1)
    calls: int = Field(ge=0)


class Incumbent(Model):
    """What serves the key now. variant_id None means the op's fallback."""

    variant_id: str | None = None
    source: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class Budget(Model):
    rounds: int = Field(3, ge=1, le=100)
    variants_per_round: int = Field(8, ge=1, le=256)


class Campaign(Model):
    """Everything a stage needs to work on a campaign without asking another service."""

    campaign_id: str = Field(default_factory=_new_id)
    key: KernelKey
    profile: list[WeightedShape] = Field(min_length=1)
    incumbent: Incumbent = Field(default_factory=Incumbent)
    budget: Budget = Field(default_factory=Budget)
    hints: list[str] = Field(default_factory=list)
    # The key's share of its op's time when the campaign started (None: not measured); the
    # deployer's manual_above policy asks a person when it is at least the approval share.
    time_share: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)


class Hardware(Model):
    """Fingerprint of the machine a benchmark ran on."""

    key: str  # the registry's hardware token, e.g. nvidia-h100-80gb-hbm3 or cpu-interpreter
    name: str
    interpreter: bool
    torch: str
    triton: str
    host: str = ""
    # Which card measured it (its UUID; the same card under any CUDA_VISIBLE_DEVICES numbering), so
    # results from the benchmarkers of a multi-GPU host can be told apart; "" on the interpreter.
    device_id: str = ""
    # What a kernel writer needs to know of a GPU; None on the interpreter or when not measured.
    sm_count: int | None = Field(None, ge=1)
    memory_gib: float | None = Field(None, gt=0, allow_inf_nan=False)
    copy_gbps: float | None = Field(None, gt=0, allow_inf_nan=False)  # measured, bytes read + written
    matmul_tflops: float | None = Field(None, gt=0, allow_inf_nan=False)  # measured, bf16 dense


class ShapeTiming(Model):
    shape: list[int]
    weight: float
    candidate_us: float  # median
    candidate_spread_us: float  # interquartile range
    incumbent_us: float
    incumbent_spread_us: float
    speedup: float  # incumbent / candidate on this shape


class UsageSnapshot(Model):
    windows: int = Field(ge=0)
    calls: int = Field(ge=0)
    time_share: float = Field(ge=0, le=1, allow_inf_nan=False)
    time_us_per_call: float | None = Field(None, ge=0, allow_inf_nan=False)


# ---- one model per subject ----------------------------------------------------------------------


class KernelStats(Event):
    """One window of aggregated calls of one (op, dtype, bucket) on one hardware, from one source."""

    key: KernelKey
    source: str = Field(min_length=1, max_length=256)  # host:pid of the process that served the calls
    window_start: datetime
    window_s: float = Field(gt=0, allow_inf_nan=False)
    calls: int = Field(ge=0)
    shapes: list[ShapeCount] = Field(default_factory=list)
    sampled_calls: int = Field(ge=0)
    sampled_time_us: float = Field(ge=0, allow_inf_nan=False)  # sum over the sampled calls
    time_us_p50: float | None = Field(None, ge=0, allow_inf_nan=False)
    time_us_p90: float | None = Field(None, ge=0, allow_inf_nan=False)
    variant_id: str | None = None  # what served the calls; None is the op's fallback

    @property
    def time_us_per_call(self) -> float | None:
        return self.sampled_time_us / self.sampled_calls if self.sampled_calls else None

    @property
    def total_time_us(self) -> float:
        return (self.time_us_per_call or 0.0) * self.calls


class UsageChanged(Event):
    key: KernelKey
    reason: Reason
    detail: str = ""
    before: UsageSnapshot | None = None
    after: UsageSnapshot | None = None
    # The workload profile of the key; a hand-written event may leave it empty and the
    # hypothesis stage fills it from what it has seen, or from the op's example shapes.
    profile: list[WeightedShape] = Field(default_factory=list)
    budget: Budget | None = None
    # What served the key in the `after` windows (None: the op's fallback), and for a regression
    # whether it followed a deploy of that variant: then the deployer answers with a rollback.
    variant_id: str | None = None
    after_deploy: bool = False


class Hypothesis(Event):
    campaign: Campaign
    reason: Reason
    efficiency: float | None = None  # measured fraction of the roofline, when known
    expected_gain: float = 0.0  # time share x headroom
    detail: str = ""


class VariantReady(Event):
    campaign: Campaign
    variant_id: str
    source: str
    params: dict[str, Any] = Field(default_factory=dict)
    strategy: Strategy
    parents: list[str] = Field(default_factory=list)
    round: int = Field(ge=0)
    round_size: int = Field(ge=1)  # variants in this round, so the deployer knows when it is complete


class BenchResult(Event):
    campaign: Campaign
    variant_id: str
    source: str
    params: dict[str, Any] = Field(default_factory=dict)
    strategy: Strategy
    round: int = Field(ge=0)
    round_size: int = Field(ge=1)
    status: Status
    error: str | None = None
    timings: list[ShapeTiming] = Field(default_factory=list)
    weighted_speedup: float | None = None
    speedup_ci_low: float | None = None
    speedup_ci_high: float | None = None
    incumbent: str = ""  # what the candidate was compared with, in words
    hardware: Hardware
    method: str = ""
    # sha256 of the source bytes the worker executed and measured. Optional so that results kept
    # from before it existed (stream history, campaign state in KV) still validate.
    measured_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class Failure(Model):
    variant_id: str
    status: Status
    error: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class Scored(Model):
    variant_id: str
    params: dict[str, Any] = Field(default_factory=dict)
    weighted_speedup: float
    speedup_ci_low: float


class Refine(Event):
    campaign: Campaign
    round: int = Field(ge=1)  # the round to generate
    rounds_left: int = Field(ge=1)
    best: list[Scored] = Field(default_factory=list)  # best so far, best first
    failures: list[Failure] = Field(default_factory=list)
    tried: list[str] = Field(default_factory=list)  # variant ids already benchmarked


class Deploy(Event):
    campaign_id: str
    key: KernelKey
    variant_id: str
    previous_variant_id: str | None = None
    speedup: float
    speedup_ci_low: float
    revision: int
    approved_by: str
    rollback: bool = False
    trace_id: str | None = None  # the campaign's trace, for `kernelloop trace`
    # What this deploy did with the variant: started its canary (it serves beside the incumbent
    # until the workloads' step times decide), promoted it after the canary, or withdrew it (a
    # rollback). A deploy without a canary, and a rollback after a live regression, read promoted.
    stage: Literal["canary", "promoted", "withdrawn"] = "promoted"
    # The canary's measure for promoted and withdrawn: incumbent / candidate step time and its CI.
    step_speedup: float | None = Field(None, gt=0, allow_inf_nan=False)
    step_speedup_ci_low: float | None = Field(None, ge=0, allow_inf_nan=False)
    step_speedup_ci_high: float | None = Field(None, ge=0)  # inf while unbounded
    detail: str = ""  # why, in words: the canary's verdict


class DeployPending(Event):
    """A winner the deploy policy holds for a person: approve or reject it on deploy.approval."""

    campaign_id: str
    key: KernelKey
    variant_id: str
    previous_variant_id: str | None = None
    speedup: float
    speedup_ci_low: float
    time_share: float | None = None
    policy: str  # why it waits, in words
    trace_id: str | None = None


class DeployApproval(Event):
    """A person's decision on a pending deploy; any client may publish it."""

    campaign_id: str = Field(min_length=1)
    decision: Literal["approve", "reject"]
    by: str = Field(min_length=1, max_length=128)  # who decided, as shown on the trace and in the registry
    reason: str = ""


class DeadLetter(Event):
    """A message a stage gave up on: malformed, invalid, or failing past its last delivery."""

    subject: str  # where it was published
    consumer: str  # which stage gave up
    reason: str  # names the field or the error
    deliveries: int = Field(ge=1)
    stream_seq: int | None = None
    payload: str  # the message as received (undecodable bytes escaped), cut to a few KB
    original_event_id: str | None = None  # its Nats-Msg-Id, when it had one


class RegistryEntry(Model):
    """The value of a registry key: what serves it, and why."""

    variant_id: str
    source: str
    params: dict[str, Any] = Field(default_factory=dict)
    speedup: float
    campaign_id: str
    approved_by: str
    deployed_at: datetime = Field(default_factory=_now)
    previous_variant_id: str | None = None
    trace_id: str | None = None
    # canary: the workloads serve it beside previous_variant_id, in turns, and report their step
    # times until the deployer promotes or withdraws it. Entries from before canaries read promoted.
    stage: Literal["canary", "promoted"] = "promoted"
    step_speedup: float | None = None  # what its canary measured (incumbent / candidate step time)


CampaignStatus = Literal["running", "deployed", "exhausted", "awaiting_approval", "rejected"]
# The statuses in which a campaign's work is still under way (no second campaign for its key then).
CAMPAIGN_IN_FLIGHT: tuple[CampaignStatus, ...] = ("running", "awaiting_approval")


class CampaignState(Model):
    """The deployer's record of one campaign (KV, subjects.CAMPAIGN_BUCKET, keyed by
    shared/registry.py `campaign_key`): written by the deployer only, read by the detector's
    campaign guard and the command line."""

    campaign: Campaign
    status: CampaignStatus = "running"
    # Open rounds: round -> variant_id -> result. A round leaves this map when it completes.
    results: dict[int, dict[str, BenchResult]] = Field(default_factory=dict)
    rounds_done: int = 0
    closed: list[int] = Field(default_factory=list)  # rounds that completed, in order
    best: list[Scored] = Field(default_factory=list)  # best first, over every completed round
    failures: list[Failure] = Field(default_factory=list)
    tried: list[str] = Field(default_factory=list)  # variant ids of completed rounds
    # What the deployer owes after a round closed; cleared once done, so a crash in between is
    # finished by whichever replica sees the campaign next.
    pending: Literal["refine", "deploy"] | None = None
    next_round: int | None = None
    winner: BenchResult | None = None  # the round's winner, to deploy now or on approval
    approved_by: str | None = None
    deployed_revision: int | None = None
    reason: str = ""  # the last decision, in words
    trace_id: str | None = None  # the trace in which the deciding round closed
    span_id: str | None = None  # the span that closed it: a person's decision joins the trace there
    announced: bool = False  # deploy.pending went out for the winner awaiting approval
    rejected_by: str | None = None
    # variant_id -> the span that recorded its result, while its round is open: the span that closes
    # the round links them all, since its decision fans in from every result.
    result_spans: dict[str, str] = Field(default_factory=dict)


class CanaryWindow(Model):
    """One canary window of one step kind in one process: each arm's median step time and step
    count (deployer/canary.py WindowPair, less the source its report names)."""

    step_kind: str = Field(min_length=1, max_length=256)  # "decode:b16", "prefill:n1024", or the kernel key
    window: int = Field(ge=0)
    candidate_us: float = Field(gt=0, allow_inf_nan=False)
    incumbent_us: float = Field(gt=0, allow_inf_nan=False)
    candidate_steps: int = Field(ge=1)
    incumbent_steps: int = Field(ge=1)


class CanaryReport(Event):
    """A workload's A/B of a canary entry: the windows it completed since its last report."""

    key: KernelKey
    variant_id: str  # the candidate
    incumbent_variant_id: str | None = None  # None: the op's fallback
    revision: int = Field(ge=1)  # the registry revision of the canary entry
    source: str = Field(min_length=1, max_length=256)  # host:pid of the workload process
    # step: one model forward (observe(model)); key: the key's own sampled time per call (ops only)
    measure: Literal["step", "key"]
    windows: list[CanaryWindow] = Field(default_factory=list)


class CanaryState(Model):
    """The deployer's record of the canary on one hardware (KV, subjects.CANARY_BUCKET, keyed by
    the hardware token): the one in flight or the last one, and the deploys waiting their turn.
    One canary at a time per hardware, so each step-time change is the candidate's."""

    hardware: str
    campaign_id: str
    key: KernelKey
    variant_id: str
    incumbent_variant_id: str | None = None
    speedup: float  # the benchmark's, for the Deploy events
    speedup_ci_low: float
    revision: int | None = None  # of the canary entry; None while claimed and not yet written
    trace_id: str | None = None
    span_id: str | None = None  # the deploy's span: the decision joins the campaign's trace there
    claimed_at: datetime = Field(default_factory=_now)
    written_at: datetime | None = None
    # source -> the windows it reported so far; measure per source
    windows: dict[str, list[CanaryWindow]] = Field(default_factory=dict)
    measures: dict[str, Literal["step", "key"]] = Field(default_factory=dict)
    last_report_at: datetime | None = None
    # The verdict so far (the figures `kernelloop status` shows), then the decision.
    step_speedup: float | None = None
    step_speedup_ci: tuple[float, float] | None = None
    judged_windows: int = 0
    reason: str = ""
    action: Literal["promote", "withdraw"] | None = None  # decided; carried out until done
    outcome: str = ""  # what was done, in words, once done
    done: bool = False
    decided_at: datetime | None = None
    waiting: list[str] = Field(default_factory=list)  # campaign ids whose deploys wait for this hardware


class ProfilerTrace(Event):
    """A PyTorch profiler trace (Chrome trace JSON) for the observer service to turn into stats."""

    source: str = Field(min_length=1, max_length=256)
    hardware: str = Field(pattern=_TOKEN, max_length=64)
    trace: dict[str, Any]


class MappedOp(Model):
    """A catalog op's calls in one profiler trace: the key, and which trace ops were taken for it."""

    key: KernelKey
    calls: int = Field(ge=0)
    time_us: float = Field(ge=0, allow_inf_nan=False)
    share: float = Field(ge=0, le=1, allow_inf_nan=False)  # of the trace's op time
    from_ops: list[str] = Field(default_factory=list)  # e.g. aten::linear, the HF RMSNorm pattern


class UnmappedOp(Model):
    """A hot op of a profiler trace that no catalog op covers: where a new op would pay."""

    name: str
    calls: int = Field(ge=0)
    time_us: float = Field(ge=0, allow_inf_nan=False)
    share: float = Field(ge=0, le=1, allow_inf_nan=False)
    shape: list[int] | None = None  # its first input's most common dims
    dtype: str | None = None
    note: str = ""  # why a catalog op did not take it, when one almost did (a dtype it lacks)


class TraceSummary(Model):
    """What the observer service made of one profiler trace; kept in TRACE_SUMMARY_BUCKET."""

    trace_id: str  # the profiler.trace event id, or the file or object it came from
    source: str
    hardware: str
    ingested_at: datetime = Field(default_factory=_now)
    status: Literal["ok", "partial", "rejected"]
    error: str | None = None
    total_time_us: float = Field(0.0, ge=0, allow_inf_nan=False)
    mapped: list[MappedOp] = Field(default_factory=list)
    unmapped: list[UnmappedOp] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)


BY_SUBJECT: dict[str, type[Event]] = {
    subjects.KERNEL_STATS: KernelStats,
    subjects.USAGE_CHANGED: UsageChanged,
    subjects.HYPOTHESIS: Hypothesis,
    subjects.VARIANT_READY: VariantReady,
    subjects.BENCH_RESULT: BenchResult,
    subjects.REFINE: Refine,
    subjects.DEPLOY: Deploy,
    subjects.PROFILER_TRACE: ProfilerTrace,
    subjects.DEPLOY_PENDING: DeployPending,
    subjects.DEPLOY_APPROVAL: DeployApproval,
    subjects.CANARY_REPORT: CanaryReport,
}
