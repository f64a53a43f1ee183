"""The workload's side of a canary (observer/sdk/canary.py) on a real dispatch table with a clock the
test moves: the arms take ABBA turns at slot boundaries, times are paired per window by the arm
that served them, a window is reported once, complete, and a candidate the dispatcher dropped ends
the canary in this process."""
import pytest

from observer.sdk.canary import CanaryController
from observer.sdk.dispatch import Dispatcher, Served
from shared.schemas import RegistryEntry

HW = "cpu-interpreter"
KEY = f"{HW}.rmsnorm.float32.h1024-r16"


def served(variant_id: str) -> Served:
    entry = RegistryEntry(variant_id=variant_id, source="", speedup=1.3, campaign_id="c", approved_by="auto-gate")
    return Served(variant_id, lambda *args: None, entry)


@pytest.fixture
def dispatcher(tmp_path):
    d = Dispatcher(tmp_path)
    d.hardware = HW
    return d


def test_arms_take_abba_turns_and_the_fallback_arm_removes_the_key(dispatcher):
    canary = CanaryController(dispatcher, "host:1", slot_s=1.0)
    candidate = served("cand")
    canary.start(KEY, 7, candidate, None, now=100.0)
    seen = []
    for t in (100.2, 101.1, 102.5, 103.0, 104.9, 105.5):
        canary.tick(t)
        seen.append(dispatcher.serving(KEY))
    # slots 0..5: A B | B A | A B  (window 1 starts with the incumbent, so drift costs both alike)
    assert seen == ["cand", None, None, "cand", "cand", None]


def test_incumbent_variant_is_swapped_in_for_its_slots(dispatcher):
    canary = CanaryController(dispatcher, "host:1", slot_s=0.5)
    old, new = served("old"), served("new")
    dispatcher.install(KEY, old)
    canary.start(KEY, 3, new, old, now=0.0)
    assert dispatcher.table[KEY] is new
    canary.tick(0.6)
    assert dispatcher.table[KEY] is old


def test_key_measure_pairs_sampled_times_by_the_variant_that_served_them(dispatcher):
    canary = CanaryController(dispatcher, "host:1", slot_s=1.0)
    canary.start(KEY, 7, served("cand"), None, now=0.0)
    sample = lambda variant, us: canary.on_sample("rmsnorm", "float32", "h1024-r16", variant, us)
    sample("cand", 100.0)
    sample("cand", 120.0)
    sample("other", 5.0)  # neither arm: ignored
    canary.on_sample("rmsnorm", "float32", "h256-r16", "cand", 7.0)  # another key: ignored
    canary.tick(1.5)
    sample(None, 300.0)
    assert canary.reports() == [], "window 0 is not complete while its second slot runs"
    canary.tick(2.1)  # window 1 begins
    (report,) = canary.reports()
    assert (report.variant_id, report.incumbent_variant_id, report.revision, report.measure) == ("cand", None, 7, "key")
    (w,) = report.windows
    assert (w.step_kind, w.window, w.candidate_us, w.incumbent_us, w.candidate_steps, w.incumbent_steps) == (
        KEY, 0, 110.0, 300.0, 2, 1)
    assert canary.reports() == [], "a window is reported once"


def test_window_missing_an_arm_is_not_reported(dispatcher):
    canary = CanaryController(dispatcher, "host:1", slot_s=1.0)
    canary.start(KEY, 7, served("cand"), None, now=0.0)
    canary.on_sample("rmsnorm", "float32", "h1024-r16", "cand", 100.0)
    canary.tick(2.5)
    assert canary.reports() == []


def test_step_measure_times_start_to_next_start_and_changes_slots_only_between_steps(dispatcher):
    canary = CanaryController(dispatcher, "host:1", slot_s=1.0)
    canary.attach_clock()
    assert canary.measure == "step"
    canary.start(KEY, 7, served("cand"), None, now=0.0)
    canary.tick(1.5)
    assert dispatcher.serving(KEY) == "cand", "with a step clock only a step's start changes the slot"
    for t in (0.1, 0.4, 0.9, 1.3, 1.8, 2.2):  # each step takes until the next one starts
        canary.step("decode:b16", t)
        if t == 1.3:
            assert dispatcher.serving(KEY) is None, "the step starting in slot 1 runs on the incumbent"
    canary.on_sample("rmsnorm", "float32", "h1024-r16", "cand", 5.0)  # the step is the measure now
    (report,) = canary.reports()
    assert report.measure == "step"
    (w,) = report.windows
    # candidate steps: 0.1-0.4, 0.4-0.9, 0.9-1.3 (started in slot 0); incumbent: 1.3-1.8, 1.8-2.2
    assert w.step_kind == "decode:b16" and (w.candidate_steps, w.incumbent_steps) == (3, 2)
    assert w.candidate_us == pytest.approx(400_000) and w.incumbent_us == pytest.approx(450_000)


def test_candidate_dropped_by_the_dispatcher_ends_the_canary_here(dispatcher):
    canary = CanaryController(dispatcher, "host:1", slot_s=1.0)
    canary.start(KEY, 7, served("cand"), None, now=0.0)
    dispatcher.remove(KEY)  # what dispatch does when a variant raises on a call
    canary.tick(1.2)
    canary.tick(3.2)
    assert KEY not in canary.trials and dispatcher.serving(KEY) is None, "the failing candidate is not put back"
    assert canary.broken and canary.broken[0][0] == KEY


def test_ended_canary_leaves_the_table_alone(dispatcher):
    canary = CanaryController(dispatcher, "host:1", slot_s=1.0)
    canary.start(KEY, 7, served("cand"), served("old"), now=0.0)
    trial = canary.end(KEY)
    assert trial.candidate.variant_id == "cand" and not canary.trials
    canary.tick(1.5)
    assert dispatcher.serving(KEY) == "cand"
