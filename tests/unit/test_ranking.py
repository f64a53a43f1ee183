"""Changes found together start in order of expected gain (detector/ranking.py): the gain is the
hypothesis' (time share times roofline headroom), so a big share with no headroom waits behind a
smaller share with much; a change that makes no hypothesis goes last."""
from detector.change import ChangeDetector
from detector.hypothesis import peaks_for
from detector.ranking import by_expected_gain
from shared.schemas import Budget, KernelKey, RegistryEntry, UsageChanged, UsageSnapshot, WeightedShape

H100 = "nvidia-h100-80gb-hbm3"
BUDGET = Budget(rounds=2, variants_per_round=3)


def change(bucket: str, time_share: float, time_us_per_call: float, op: str = "rmsnorm") -> UsageChanged:
    return UsageChanged(key=KernelKey(hardware=H100, op=op, dtype="float16", bucket=bucket), reason="new_shape",
                        profile=[WeightedShape(shape=[16, 4096], weight=1.0)],
                        after=UsageSnapshot(windows=2, calls=100, time_share=time_share,
                                            time_us_per_call=time_us_per_call))


async def nothing_deployed(key) -> RegistryEntry | None:
    return None


async def datasheet(hardware: str):
    return peaks_for(hardware)


async def test_changes_found_together_start_biggest_expected_gain_first():
    at_roofline = change("h4096-r16", time_share=0.6, time_us_per_call=1e-6)  # no headroom: gain 0
    far_from_it = change("h4096-r4k", time_share=0.3, time_us_per_call=1e6)  # all headroom: gain ~0.3
    unknown_op = change("h4096-r64", time_share=0.9, time_us_per_call=1e6, op="gelu")
    ranked = await by_expected_gain([at_roofline, unknown_op, far_from_it], ChangeDetector(), BUDGET,
                                    nothing_deployed, datasheet)
    assert ranked == [far_from_it, at_roofline, unknown_op]


async def test_without_a_roofline_the_bigger_time_share_starts_first():
    at_roofline = change("h4096-r16", time_share=0.6, time_us_per_call=1e-6)
    far_from_it = change("h4096-r4k", time_share=0.3, time_us_per_call=1e6)

    async def no_peaks(hardware: str):
        return None

    ranked = await by_expected_gain([far_from_it, at_roofline], ChangeDetector(), BUDGET, nothing_deployed, no_peaks)
    assert ranked == [at_roofline, far_from_it]


async def test_a_change_found_alone_is_not_looked_up():
    async def must_not_read(_):
        raise AssertionError("no KV read for a change found alone")

    alone = [change("h4096-r16", time_share=0.6, time_us_per_call=1.0)]
    assert await by_expected_gain(alone, ChangeDetector(), BUDGET, must_not_read, must_not_read) == alone
