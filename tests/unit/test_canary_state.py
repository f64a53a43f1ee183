"""The deployer's canary record (deployer/canary_state.py), pure: one canary at a time per hardware
with the others waiting their turn, reports merged over processes and redeliveries, and the verdict,
or a withdrawal once the time limit passes undecided."""
from datetime import datetime, timedelta, timezone

from deployer.canary_state import CanaryConfig, add_report, claim, judge, release, written
from shared.canary import summarise
from shared.schemas import CanaryReport, CanaryWindow, KernelKey
from support.step_streams import simulate

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
KEY = KernelKey(hardware="h100", op="rmsnorm", dtype="bfloat16", bucket="h4096-r1")
OTHER_KEY = KEY.model_copy(update={"bucket": "h4096-r64"})
CONFIG = CanaryConfig(max_s=300.0)


def claimed(campaign_id: str = "c1", key: KernelKey = KEY, run=None):
    return claim(run, campaign_id, key, f"v-{campaign_id}", None, 1.4, 1.3, T0)


def running(revision: int = 5):
    run, _ = claimed()
    run, _ = written(run, "c1", revision, "ab" * 16, "cd" * 8, T0)
    return run


def reports(factor: float, source: str, revision: int = 5, seed: int = 0, per_report: int = 2) -> list[CanaryReport]:
    """What one workload process sends: its windows, a few at a time."""
    pairs = summarise(simulate(seed, {"decode:b16": factor}, windows=40), source)
    windows = [CanaryWindow(step_kind=p.step_kind, window=p.window, candidate_us=p.candidate_us,
                            incumbent_us=p.incumbent_us, candidate_steps=p.candidate_steps,
                            incumbent_steps=p.incumbent_steps) for p in pairs]
    return [CanaryReport(key=KEY, variant_id="v-c1", revision=revision, source=source, measure="step",
                         windows=windows[i:i + per_report]) for i in range(0, len(windows), per_report)]


def test_the_first_winner_takes_the_hardware_and_another_keys_winner_waits_its_turn():
    run, got = claimed("c1")
    assert got == "ours" and run.campaign_id == "c1" and run.revision is None
    run, got = claimed("c2", OTHER_KEY, run)
    assert got == "wait" and run.campaign_id == "c1" and run.waiting == ["c2"]
    run, got = claimed("c2", OTHER_KEY, run)
    assert got == "wait" and run.waiting == ["c2"], "waiting once, however often it asks"
    assert claimed("c1", run=run)[1] == "ours", "the holder resumes after a crash"


def test_a_winner_measured_against_what_a_canary_replaces_on_its_key_stands_down():
    run, _ = claimed("c1")
    assert claimed("c3", KEY, run)[1] == "same_key"


def test_a_winner_measured_against_the_canary_candidate_of_its_key_waits():
    run, _ = claimed("c1")
    run, got = claim(run, "c4", KEY, "v-c4", "v-c1", 1.2, 1.1, T0)
    assert got == "wait" and run.waiting == ["c4"]


def test_when_the_canary_is_done_the_next_winner_takes_the_hardware_and_leaves_the_queue():
    run, _ = claimed("c1")
    run, _ = claimed("c2", OTHER_KEY, run)
    run = run.model_copy(update={"done": True, "outcome": "promoted at revision 6"})
    run, got = claimed("c2", OTHER_KEY, run)
    assert got == "ours" and run.campaign_id == "c2" and run.waiting == [] and not run.done


def test_a_claim_whose_deploy_did_not_happen_frees_the_hardware():
    run, _ = claimed("c1")
    run, _ = release(run, "c1", "the incumbent changed", T0)
    assert run.done and claimed("c2", OTHER_KEY, run)[1] == "ours"
    assert release(running(), "c1", "late", T0)[0].done is False, "a written canary is not released"


def test_reports_before_the_entry_is_written_or_for_another_revision_are_ignored():
    run, _ = claimed("c1")
    report = reports(1.0, "p1")[0]
    assert add_report(run, report, T0)[1].startswith("no canary in flight")
    assert add_report(running(5), reports(1.0, "p1", revision=4)[0], T0)[1].startswith("no canary in flight")


def test_windows_merge_over_processes_and_a_redelivered_report_counts_once():
    run = running()
    first, second = reports(1.0, "p1")[:2]
    run, note = add_report(run, first, T0)
    assert note == "" and len(run.windows["p1"]) == 2
    run, note = add_report(run, first, T0)
    assert note.startswith("nothing new") and len(run.windows["p1"]) == 2
    run, _ = add_report(run, second, T0)
    run, _ = add_report(run, reports(1.0, "p2", seed=1)[0], T0)
    assert {s: len(w) for s, w in run.windows.items()} == {"p1": 4, "p2": 2}
    changed = first.windows[0].model_copy(update={"candidate_us": 1.0})
    run2, note = add_report(run, first.model_copy(update={"windows": [changed]}), T0)
    assert run2 == run and "conflicting" in note, "a window, once counted, never changes"


def feed(run, batches):
    """Reports in arrival order, judged after each as the deployer does; stops at the first verdict."""
    for report in batches:
        run, _ = add_report(run, report, T0)
        run, verdict = judge(run, CONFIG, T0 + timedelta(seconds=10))
        if verdict is not None:
            return run, verdict
    return run, None


def interleave(*streams):
    return [r for batch in zip(*streams) for r in batch]


def test_step_135x_slower_across_two_processes_is_withdrawn():
    run, verdict = feed(running(), interleave(reports(1.35, "p1", seed=2), reports(1.35, "p2", seed=3)))
    assert run.action == "withdraw" and verdict.slower and run.step_speedup < 1
    assert run.step_speedup_ci[1] < 1 and set(run.windows) == {"p1", "p2"}


def test_step_11x_faster_across_two_processes_is_promoted():
    run, verdict = feed(running(), interleave(reports(1 / 1.1, "p1", seed=4), reports(1 / 1.1, "p2", seed=5)))
    assert run.action == "promote" and verdict.action == "promote"
    assert run.step_speedup_ci[0] > 1 and run.judged_windows >= CONFIG.policy.min_windows


def test_no_verdict_before_min_windows_and_figures_kept_meanwhile():
    run, verdict = feed(running(), reports(1.35, "p1", seed=6, per_report=1)[:3])
    assert verdict is None and run.action is None and run.judged_windows == 3


def test_canary_without_any_report_is_withdrawn_at_its_time_limit_for_no_evidence():
    run, verdict = judge(running(), CONFIG, T0 + timedelta(seconds=299))
    assert run.action is None and verdict is None
    run, _ = judge(run, CONFIG, T0 + timedelta(seconds=301))
    assert run.action == "withdraw" and run.reason.startswith("no evidence")


def test_undecided_canary_is_withdrawn_at_its_time_limit_as_not_faster():
    run, _ = feed(running(), reports(1.0, "p1", seed=7)[:4])
    run, _ = judge(run, CONFIG, T0 + timedelta(seconds=301))
    assert run.action == "withdraw" and run.reason.startswith("not faster beyond the noise")


def test_status_line_shows_the_figures_so_far_then_how_it_ended():
    from shared.history import canary_line

    run, _ = feed(running(), reports(1.35, "p1", seed=8, per_report=1)[:7])
    line = canary_line(run.model_copy(update={"action": None}))
    assert line.startswith("rmsnorm.bfloat16.h4096-r1  v-c1 vs fallback  running  step 0.")
    assert "CI [" in line and "7 windows from 1 process" in line and "(rev 5)" in line
    done = run.model_copy(update={"done": True, "outcome": "withdrawn at revision 6: fallback serves again"})
    assert "withdrawn at revision 6" in canary_line(done)
