"""The hypothesis stage: a usage change plus what serves the key now -> a campaign for the
generator, with the workload profile, the headroom against the roofline and the expected gain."""
import hashlib
import math
from dataclasses import dataclass

from shared.ops import get_op, torch_dtype
from shared.schemas import (Budget, Campaign, Hardware, Hypothesis, Incumbent, KernelKey, RegistryEntry,
                            UsageChanged, WeightedShape)

# Intensities below every listed ridge point are memory-bound on any of these GPUs.
_MEMORY_BOUND_EVERYWHERE = "memory-bound on every GPU in the datasheet table"


@dataclass(frozen=True)
class Peaks:
    """A device's roofline: peak memory bandwidth and dense peak FLOP rate per dtype."""

    name: str
    bandwidth_bytes_s: float
    flops_s: dict[str, float]  # dtype -> dense FLOP/s (tensor cores for 16-bit, CUDA cores for fp32)
    source: str = "from the datasheet"  # where the figures come from, as the evidence says it

    def ridge(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) where the roofline turns from memory to compute."""
        return self.flops_s[dtype] / self.bandwidth_bytes_s


def _peaks(name: str, bandwidth_tb_s: float, tensor_tflops: float, fp32_tflops: float) -> Peaks:
    return Peaks(name, bandwidth_tb_s * 1e12, {"bfloat16": tensor_tflops * 1e12, "float16": tensor_tflops * 1e12,
                                               "float32": fp32_tflops * 1e12})


# Vendor datasheet numbers, matched on tokens of the hardware key (slug of the device name);
# the first row whose tokens all appear wins, so the more specific rows come first.
DATASHEET: tuple[tuple[tuple[str, ...], Peaks], ...] = (
    (("h100", "pcie"), _peaks("H100 PCIe", 2.0, 756, 51)),
    (("h100", "hbm3"), _peaks("H100 SXM", 3.35, 989, 67)),
    (("h100", "sxm"), _peaks("H100 SXM", 3.35, 989, 67)),
    (("h200",), _peaks("H200 SXM", 4.8, 989, 67)),
    (("a100", "80gb", "pcie"), _peaks("A100 PCIe 80GB", 1.935, 312, 19.5)),
    (("a100", "80gb"), _peaks("A100 SXM 80GB", 2.039, 312, 19.5)),
    (("a100",), _peaks("A100 40GB", 1.555, 312, 19.5)),
    (("l4",), _peaks("L4", 0.3, 121, 30.3)),
)


def peaks_for(hardware: str, measured: Hardware | None = None) -> Peaks | None:
    """The roofline of a hardware key: what a benchmarker measured on that kind of GPU where it
    did (copy bandwidth, bf16 matmul rate; fp32 is not measured and comes from the datasheet),
    else the datasheet row its device name matches."""
    tokens = set(hardware.lower().split("-"))
    sheet = next((peaks for needed, peaks in DATASHEET if tokens.issuperset(needed)), None)
    if measured is None or measured.copy_gbps is None or measured.matmul_tflops is None:
        return sheet
    rate = measured.matmul_tflops * 1e12
    # Without a datasheet row the fp32 rate is unknown; the bf16 one stands in as an upper bound, so
    # an fp32 kernel's efficiency reads low rather than high.
    fp32, fp32_from = (sheet.flops_s["float32"], "the datasheet") if sheet else (rate, "the bf16 rate")
    return Peaks(measured.name, measured.copy_gbps * 1e9, {"bfloat16": rate, "float16": rate, "float32": fp32},
                 source=f"measured by a benchmarker (fp32 from {fp32_from})")


def incumbent_from(entry: RegistryEntry | None) -> Incumbent:
    """What serves the key: the registry's deployed variant, else the op's fallback."""
    if entry is None:
        return Incumbent()
    return Incumbent(variant_id=entry.variant_id, source=entry.source, params=dict(entry.params))


def hypothesis_event_id(usage_changed_id: str) -> str:
    """Deterministic, so a redelivered usage.changed is de-duplicated instead of starting a second
    campaign; hashed when the plain form would pass the 128-character limit of event ids."""
    plain = f"hypothesis-{usage_changed_id}"
    return plain if len(plain) <= 128 else f"hypothesis-{hashlib.sha256(usage_changed_id.encode()).hexdigest()[:32]}"


def choose_profile(event: UsageChanged, known: list[WeightedShape] | None, op) -> tuple[list[WeightedShape], str]:
    if event.profile:
        return list(event.profile), "from the event"
    if known:
        return list(known), "as observed"
    try:
        shapes = op.example_shapes(event.key.bucket)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"key.bucket {event.key.bucket!r} is not a bucket of op {event.key.op!r}: {e}") from None
    return [WeightedShape(shape=s, weight=1.0) for s in shapes], "the op's example shapes for the bucket"


def weighted_cost(op, key: KernelKey, profile: list[WeightedShape]) -> tuple[float, float]:
    """Mean FLOPs and bytes per call over the profile."""
    dtype = torch_dtype(key.dtype)
    total = sum(w.weight for w in profile)
    flops = sum(w.weight * op.cost(w.shape, dtype).flops for w in profile) / total
    bytes_moved = sum(w.weight * op.cost(w.shape, dtype).bytes_moved for w in profile) / total
    return flops, bytes_moved


def bound_hints(key: KernelKey, intensity: float, peaks: Peaks | None) -> list[str]:
    hints = [f"arithmetic intensity {intensity:.2f} FLOP/byte"]
    if peaks is not None:
        ridge = peaks.ridge(key.dtype)
        hints.insert(0, "memory-bound" if intensity < ridge else "compute-bound")
        hints[1] += f" (ridge point of {peaks.name}: {ridge:.0f}, peaks {peaks.source})"
        return hints
    ridges = [p.ridge(key.dtype) for _, p in DATASHEET]
    if intensity < min(ridges):
        hints.insert(0, "memory-bound")
        hints[1] += f" ({_MEMORY_BOUND_EVERYWHERE})"
    elif intensity > max(ridges):
        hints.insert(0, "compute-bound")
    return hints


def shape_hints(op_name: str, profile: list[WeightedShape]) -> list[str]:
    """What the profile's dominant shapes suggest to a generator, for matmuls and row-wise ops."""
    top = max(profile, key=lambda w: w.weight).shape
    if op_name == "matmul" and len(top) == 3:
        m, n, k = top
        if m <= 64 and k >= 8 * max(m, 16):
            return [f"small-M matmul (M={m}, K={k}): split-K to fill the device, small BLOCK_M"]
        if m >= 1024 and n >= 1024:
            return [f"large matmul ({m}x{n}x{k}): large tiles, deeper software pipelining (num_stages)"]
        return []
    rows, cols = math.prod(top[:-1]), top[-1]
    hints = []
    if cols > 8192:
        hints.append(f"long rows ({cols}): loop over the row in blocks"
                     + (" with an online (single-pass) max and sum" if op_name == "softmax" else ""))
    elif cols <= 1024 and rows >= 1024:
        hints.append(f"short rows ({cols}) and many of them ({rows}): several rows per program")
    if rows <= 16:
        hints.append(f"few rows ({rows}): one program per row leaves most of the device idle; split the row "
                     "or use fewer, wider programs")
    return hints


def worth_a_campaign(hypothesis: Hypothesis, min_expected_gain: float) -> tuple[bool, str]:
    """Whether a hypothesis should start a campaign, and why, in words for the log. A person's
    manual event always does; a regression after a deploy never does (the deployer rolls back)."""
    gain = hypothesis.expected_gain
    if hypothesis.reason == "manual":
        return True, "started by hand"
    if gain < min_expected_gain:
        return False, (f"expected gain {gain:.2%} of the op's time is below the minimum {min_expected_gain:.2%} "
                       f"(KERNELLOOP_MIN_EXPECTED_GAIN)")
    return True, f"expected gain {gain:.2%} of the op's time"


def rank(hypotheses: list[Hypothesis]) -> list[Hypothesis]:
    """Most expected gain first: when several changes land together, the best campaign starts first."""
    return sorted(hypotheses, key=lambda h: h.expected_gain, reverse=True)


def build_hypothesis(event: UsageChanged, profile: list[WeightedShape] | None, incumbent: Incumbent,
                     budget: Budget, observed_time_us_per_call: float | None, peaks: Peaks | None,
                     time_share: float | None = None) -> Hypothesis:
    """profile, observed_time_us_per_call and time_share: what the caller knows of the key, used
    where the event carries none (its profile, its `after` snapshot); budget: the default, used
    when the event names none."""
    key = event.key
    try:
        op = get_op(key.op)
    except KeyError:
        raise ValueError(f"key.op {key.op!r} is not a known op") from None
    shapes, origin = choose_profile(event, profile, op)
    flops, bytes_moved = weighted_cost(op, key, shapes)
    hints = bound_hints(key, flops / bytes_moved if bytes_moved else 0.0, peaks)
    if event.after is not None:
        time_share = event.after.time_share
        observed_time_us_per_call = event.after.time_us_per_call or observed_time_us_per_call

    details = [event.detail] if event.detail else []
    details.append(f"profile: {len(shapes)} shape(s), {origin}")
    efficiency = None
    if "interpreter" in key.hardware:
        details.append("efficiency unknown: interpreter timings measure the interpreter, not a device roofline")
    elif peaks is None:
        details.append(f"efficiency unknown: no datasheet peaks for hardware {key.hardware!r}")
    elif not observed_time_us_per_call:
        details.append("efficiency unknown: no timed calls for this key yet")
    else:
        # time the roofline allows per call: bytes at peak bandwidth or FLOPs at peak rate
        roofline_us = max(bytes_moved / peaks.bandwidth_bytes_s, flops / peaks.flops_s[key.dtype]) * 1e6
        efficiency = min(1.0, roofline_us / observed_time_us_per_call)
        details.append(f"efficiency {efficiency:.0%} of the {peaks.name} roofline (peaks {peaks.source}: "
                       f"{peaks.bandwidth_bytes_s / 1e12:.2f} TB/s, {peaks.flops_s[key.dtype] / 1e12:.0f} "
                       f"TFLOP/s {key.dtype}); {observed_time_us_per_call:.2f} us per call vs "
                       f"{roofline_us:.2f} us at the roofline")

    if time_share is None:
        expected_gain = 0.0
        details.append("expected gain unknown: no time share measured")
    elif efficiency is None:
        expected_gain = time_share  # the whole share is the bound when the headroom is unknown
        details.append(f"expected gain at most {expected_gain:.1%} of the op's time (its time share)")
    else:
        expected_gain = time_share * (1.0 - efficiency)
        details.append(f"expected gain {expected_gain:.1%} = time share {time_share:.1%} x headroom "
                       f"{1.0 - efficiency:.0%}")

    hints += shape_hints(op.NAME, shapes)
    # The campaign id follows the event too: a redelivered event names the same campaign everywhere.
    campaign_id = hashlib.sha256(f"campaign|{event.event_id}".encode()).hexdigest()[:32]
    campaign = Campaign(campaign_id=campaign_id, key=key, profile=shapes, incumbent=incumbent,
                        budget=event.budget or budget, hints=hints,
                        time_share=min(1.0, time_share) if time_share is not None else None)
    return Hypothesis(event_id=hypothesis_event_id(event.event_id), campaign=campaign, reason=event.reason,
                      efficiency=efficiency, expected_gain=expected_gain, detail="; ".join(details))
