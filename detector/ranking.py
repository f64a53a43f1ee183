"""Changes found together (one slot judged, several keys changed) start in order of expected gain,
so the biggest campaign starts first; the gain comes from the hypothesis each change would make."""
from detector.change import ChangeDetector
from detector.hypothesis import build_hypothesis, incumbent_from, rank
from detector.lookups import PeaksRead, RegistryRead
from shared.schemas import Budget, UsageChanged


async def by_expected_gain(changes: list[UsageChanged], detector: ChangeDetector, budget: Budget,
                           read_registry: RegistryRead, read_peaks: PeaksRead) -> list[UsageChanged]:
    """Changes found together, the biggest expected gain first; those that make no hypothesis last."""
    if len(changes) < 2:
        return changes
    hypotheses = {}
    for change in changes:
        try:
            incumbent = incumbent_from(await read_registry(change.key))
            h = build_hypothesis(change, detector.profile(change.key), incumbent, budget,
                                 detector.time_us_per_call(change.key), await read_peaks(change.key.hardware))
        except ValueError:
            continue  # the hypothesis stage refuses it with the reason; last in line here
        hypotheses[h.event_id] = (h, change)
    ranked = [hypotheses[h.event_id][1] for h in rank([h for h, _ in hypotheses.values()])]
    return ranked + [c for c in changes if c not in ranked]
