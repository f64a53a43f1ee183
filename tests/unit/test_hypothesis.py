"""The hypothesis stage as a pure function: profile choice, incumbent, budget, roofline headroom,
expected gain, and refusal of events it cannot serve."""
import pytest

from detector.hypothesis import (build_hypothesis, hypothesis_event_id, incumbent_from, peaks_for, rank, shape_hints,
                                 worth_a_campaign)
from shared.schemas import (Budget, Hardware, Incumbent, KernelKey, RegistryEntry, UsageChanged, UsageSnapshot,
                            WeightedShape)

CPU = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h4096-r16")
H100 = KernelKey(hardware="nvidia-h100-80gb-hbm3", op="rmsnorm", dtype="bfloat16", bucket="h4096-r4k")
DEFAULT_BUDGET = Budget(rounds=2, variants_per_round=4)


def observed(key: KernelKey, share: float = 0.4, us: float | None = None, **kw) -> UsageChanged:
    return UsageChanged(key=key, reason="new_shape", detail="bucket took 40% of the time",
                        after=UsageSnapshot(windows=2, calls=200, time_share=share, time_us_per_call=us), **kw)


def test_hypothesis_carries_the_event_profile_with_its_weights():
    profile = [WeightedShape(shape=[8, 4096], weight=0.75), WeightedShape(shape=[16, 4096], weight=0.25)]
    h = build_hypothesis(observed(CPU, profile=profile), None, Incumbent(), DEFAULT_BUDGET, 12.0, None)
    assert h.campaign.profile == profile
    assert h.campaign.key == CPU and h.reason == "new_shape"
    assert h.campaign.budget == DEFAULT_BUDGET


def test_detector_profile_fills_an_event_without_one():
    seen = [WeightedShape(shape=[3, 4096], weight=0.9), WeightedShape(shape=[1, 4096], weight=0.1)]
    h = build_hypothesis(observed(CPU), seen, Incumbent(), DEFAULT_BUDGET, None, None)
    assert h.campaign.profile == seen
    assert "as observed" in h.detail


def test_incumbent_comes_from_the_registry_entry():
    entry = RegistryEntry(variant_id="abc123", source="def launch(x, weight, eps=1e-6): ...",
                          params={"BLOCK": 1024, "ROWS": 2, "num_warps": 4}, speedup=1.3, campaign_id="c1",
                          approved_by="gate")
    h = build_hypothesis(observed(CPU), None, incumbent_from(entry), DEFAULT_BUDGET, None, None)
    assert h.campaign.incumbent.variant_id == "abc123"
    assert h.campaign.incumbent.params == {"BLOCK": 1024, "ROWS": 2, "num_warps": 4}
    assert h.campaign.incumbent.source == entry.source
    assert incumbent_from(None) == Incumbent(variant_id=None)


def test_manual_event_without_profile_gets_the_ops_example_shapes():
    manual = UsageChanged(key=CPU, reason="manual", budget=Budget(rounds=1, variants_per_round=2))
    h = build_hypothesis(manual, None, Incumbent(), DEFAULT_BUDGET, None, None)
    assert [(w.shape, w.weight) for w in h.campaign.profile] == [([16, 4096], 1.0)]
    assert h.campaign.budget == Budget(rounds=1, variants_per_round=2)  # the event's budget wins
    assert h.reason == "manual"
    assert h.expected_gain == 0.0 and "no time share" in h.detail


def test_unknown_op_is_refused_naming_the_op():
    event = UsageChanged(key=CPU.model_copy(update={"op": "no_such_op"}), reason="manual")
    with pytest.raises(ValueError, match="'no_such_op'"):
        build_hypothesis(event, None, Incumbent(), DEFAULT_BUDGET, None, None)


def test_bucket_the_op_cannot_read_is_refused_naming_the_bucket():
    event = UsageChanged(key=CPU.model_copy(update={"bucket": "decode"}), reason="manual")
    with pytest.raises(ValueError, match="'decode'"):
        build_hypothesis(event, None, Incumbent(), DEFAULT_BUDGET, None, None)


def test_efficiency_against_the_h100_datasheet_roofline():
    profile = [WeightedShape(shape=[4096, 4096], weight=1.0)]
    roofline_us = (2 * 4096 * 4096 + 4096) * 2 / 3.35e12 * 1e6  # bf16 bytes at 3.35 TB/s
    h = build_hypothesis(observed(H100, share=0.4, us=2 * roofline_us, profile=profile), None, Incumbent(),
                         DEFAULT_BUDGET, None, peaks_for(H100.hardware))
    assert h.efficiency == pytest.approx(0.5)
    assert h.expected_gain == pytest.approx(0.4 * 0.5)
    assert "datasheet" in h.detail and "H100 SXM" in h.detail
    assert h.campaign.hints[0] == "memory-bound"


def test_time_per_call_from_the_detector_is_used_when_the_event_has_none():
    profile = [WeightedShape(shape=[4096, 4096], weight=1.0)]
    roofline_us = (2 * 4096 * 4096 + 4096) * 2 / 3.35e12 * 1e6
    h = build_hypothesis(observed(H100, share=0.2, profile=profile), None, Incumbent(), DEFAULT_BUDGET,
                         4 * roofline_us, peaks_for(H100.hardware))
    assert h.efficiency == pytest.approx(0.25)
    assert h.expected_gain == pytest.approx(0.2 * 0.75)


def test_interpreter_has_no_efficiency_and_says_why():
    h = build_hypothesis(observed(CPU, share=0.3, us=900.0), None, Incumbent(), DEFAULT_BUDGET, None,
                         peaks_for(CPU.hardware))
    assert h.efficiency is None
    assert "interpreter" in h.detail
    assert h.expected_gain == pytest.approx(0.3)  # the share bounds the gain when headroom is unknown
    assert h.campaign.hints[0] == "memory-bound"  # RMSNorm is below every GPU's ridge point


def test_unknown_gpu_has_no_efficiency_and_names_the_hardware():
    key = H100.model_copy(update={"hardware": "nvidia-l40s"})
    assert peaks_for(key.hardware) is None  # not mistaken for an L4
    h = build_hypothesis(observed(key, us=50.0), None, Incumbent(), DEFAULT_BUDGET, None, None)
    assert h.efficiency is None and "nvidia-l40s" in h.detail


def test_datasheet_matches_device_name_tokens():
    assert peaks_for("nvidia-h100-pcie").name == "H100 PCIe"
    assert peaks_for("nvidia-h200").bandwidth_bytes_s == pytest.approx(4.8e12)
    assert peaks_for("nvidia-h100-80gb-hbm3").flops_s["bfloat16"] == pytest.approx(989e12)


def measured_h100(copy_gbps=3033.0, matmul_tflops=790.0, key="nvidia-h100-80gb-hbm3") -> Hardware:
    return Hardware(key=key, name="NVIDIA H100 80GB HBM3", interpreter=False, torch="2.11", triton="3.6",
                    copy_gbps=copy_gbps, matmul_tflops=matmul_tflops)


def test_efficiency_against_the_peaks_a_benchmarker_measured_on_the_card():
    profile = [WeightedShape(shape=[4096, 4096], weight=1.0)]
    roofline_us = (2 * 4096 * 4096 + 4096) * 2 / 3.033e12 * 1e6  # bf16 bytes at the measured 3.03 TB/s
    peaks = peaks_for(H100.hardware, measured_h100())
    h = build_hypothesis(observed(H100, share=0.4, us=2 * roofline_us, profile=profile), None, Incumbent(),
                         DEFAULT_BUDGET, None, peaks)
    assert h.efficiency == pytest.approx(0.5)
    assert "peaks measured by a benchmarker (fp32 from the datasheet): 3.03 TB/s, 790 TFLOP/s" in h.detail
    assert peaks.flops_s["float32"] == pytest.approx(67e12)  # not measured: the datasheet's


def test_measured_peaks_need_both_figures_and_stand_alone_for_a_card_the_datasheet_lacks():
    assert peaks_for(H100.hardware, measured_h100(copy_gbps=None)).source == "from the datasheet"
    unknown = peaks_for("nvidia-l40s", measured_h100(copy_gbps=800.0, matmul_tflops=300.0, key="nvidia-l40s"))
    assert unknown.bandwidth_bytes_s == pytest.approx(800e9)
    assert unknown.flops_s["float32"] == pytest.approx(300e12) and "bf16 rate" in unknown.source


def test_hypothesis_id_follows_the_usage_changed_id():
    event = observed(CPU)
    first = build_hypothesis(event, None, Incumbent(), DEFAULT_BUDGET, None, None)
    again = build_hypothesis(event, None, Incumbent(), DEFAULT_BUDGET, None, None)
    assert first.event_id == again.event_id == f"hypothesis-{event.event_id}"
    long_id = "x" * 128
    assert len(hypothesis_event_id(long_id)) <= 128
    assert hypothesis_event_id(long_id) == hypothesis_event_id(long_id) != hypothesis_event_id("y" * 128)


def test_campaign_carries_the_time_share_and_an_id_that_follows_the_event():
    event = observed(CPU, share=0.3)
    first = build_hypothesis(event, None, Incumbent(), DEFAULT_BUDGET, None, None)
    again = build_hypothesis(event, None, Incumbent(), DEFAULT_BUDGET, None, None)
    assert first.campaign.time_share == pytest.approx(0.3)
    assert first.campaign.campaign_id == again.campaign.campaign_id != build_hypothesis(
        observed(CPU), None, Incumbent(), DEFAULT_BUDGET, None, None).campaign.campaign_id


def test_small_m_matmul_is_hinted_split_k():
    key = H100.model_copy(update={"op": "matmul", "bucket": "n4096-k4096-m16"})
    profile = [WeightedShape(shape=[16, 4096, 4096], weight=1.0)]
    h = build_hypothesis(observed(key, profile=profile), None, Incumbent(), DEFAULT_BUDGET, None,
                         peaks_for(key.hardware))
    assert any("split-K" in hint for hint in h.campaign.hints)


def test_long_softmax_rows_are_hinted_online_softmax():
    assert any("online" in hint for hint in shape_hints("softmax", [WeightedShape(shape=[64, 32768], weight=1.0)]))
    assert any("few rows" in hint for hint in shape_hints("rmsnorm", [WeightedShape(shape=[4, 4096], weight=1.0)]))
    assert shape_hints("rmsnorm", [WeightedShape(shape=[256, 4096], weight=1.0)]) == []


def test_below_the_minimum_expected_gain_no_campaign_starts_and_says_why():
    small = build_hypothesis(observed(CPU, share=0.004), None, Incumbent(), DEFAULT_BUDGET, None, None)
    worth, why = worth_a_campaign(small, min_expected_gain=0.01)
    assert not worth and "0.40%" in why and "KERNELLOOP_MIN_EXPECTED_GAIN" in why
    assert worth_a_campaign(build_hypothesis(observed(CPU, share=0.2), None, Incumbent(), DEFAULT_BUDGET, None,
                                             None), 0.01)[0]


def test_a_manual_event_starts_a_campaign_whatever_its_gain():
    manual = build_hypothesis(UsageChanged(key=CPU, reason="manual"), None, Incumbent(), DEFAULT_BUDGET, None, None)
    assert manual.expected_gain == 0.0 and worth_a_campaign(manual, 0.5)[0]


def test_hypotheses_are_ranked_by_expected_gain():
    shares = [0.1, 0.5, 0.3]
    ranked = rank([build_hypothesis(observed(CPU, share=s), None, Incumbent(), DEFAULT_BUDGET, None, None)
                   for s in shares])
    assert [h.expected_gain for h in ranked] == pytest.approx([0.5, 0.3, 0.1])
