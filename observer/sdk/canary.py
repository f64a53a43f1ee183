"""The workload's side of a canary. While the registry names a canary entry for a key, the candidate
and the incumbent (the variant it replaces, or the op's fallback) take turns serving the key, one
slot each (shared/canary.py arm_for_slot: ABBA, two slots a window), by swapping the key's entry in
the dispatch table. Each completed window's median time per arm and step kind goes to the deployer
as a CanaryReport, which decides on every process's windows.

The measure is the model's step when observe(model) attached a step clock (observer/sdk/steps.py):
slots then change only at a step's start, so every step runs on one arm. A workload that only calls
kernelloop.ops measures the key's own time per call instead: the dispatcher's sampled calls (the
wall clock on the CPU, device events on CUDA), told apart by the variant that served them, with the
key as their step kind; its slots change on the runtime's background thread.

Thread-safe: slots change on the workload's thread (steps) or the background thread (ticks), calls
are timed on the workload's, trials start and end on the background thread; one lock guards them."""
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from observer.sdk.dispatch import Dispatcher, Served
from shared.canary import Step, arm_for_slot, summarise
from shared.schemas import CanaryReport, CanaryWindow, KernelKey

log = logging.getLogger("kernelloop.observer")


@dataclass
class Trial:
    """One key's canary in this process."""

    key: str
    revision: int  # of the canary entry in the registry
    candidate: Served
    incumbent: Served | None  # None: the op's fallback
    started: float  # clock time of slot 0's start
    slot: int = -1  # the slot whose arm the table holds
    installed: Served | None = None  # what this trial put in the table for that slot
    steps: list[Step] = field(default_factory=list)  # of windows not yet reported

    @property
    def window(self) -> int:
        return max(self.slot, 0) // 2

    def arm(self, variant_id: str | None) -> str | None:
        """Which arm a call served by variant_id (None: the fallback) belongs to; None for neither."""
        if variant_id == self.candidate.variant_id:
            return "candidate"
        if variant_id == (self.incumbent.variant_id if self.incumbent else None):
            return "incumbent"
        return None


class CanaryController:
    """The canaries of one process. start() and end() come from the hot swap, step() from the step
    clock, on_sample() from the window aggregator, tick() and reports() from the runtime's thread."""

    def __init__(self, dispatcher: Dispatcher, source: str, slot_s: float, clock=time.perf_counter):
        if slot_s <= 0:
            raise ValueError(f"slot_s must be positive, got {slot_s}")
        self.dispatcher = dispatcher
        self.source = source
        self.slot_s = slot_s
        self.clock = clock
        self.trials: dict[str, Trial] = {}
        self.broken: list[tuple[str, str]] = []  # (key, why) of trials that stopped here
        self._clocks = 0  # step clocks attached: while any is, steps drive the slots
        self._last: tuple[float, str, dict[str, tuple[int, str]]] | None = None  # start, kind, key -> (window, arm)
        self._lock = threading.Lock()

    @property
    def measure(self) -> Literal["step", "key"]:
        return "step" if self._clocks else "key"

    def attach_clock(self) -> None:
        with self._lock:
            self._clocks += 1

    def detach_clock(self) -> None:
        with self._lock:
            self._clocks = max(0, self._clocks - 1)
            self._last = None

    # ---- from the hot swap --------------------------------------------------------------------

    def start(self, key: str, revision: int, candidate: Served, incumbent: Served | None,
              now: float | None = None) -> Trial:
        """Serve key by turns from now on; slot 0 is the candidate's."""
        with self._lock:
            trial = self.trials[key] = Trial(key, revision, candidate, incumbent, self.clock() if now is None else now)
            self._switch(trial, trial.started)
        log.warning("canary: %s served by turns: %s (candidate) and %s, %g s slots, measured by %s", key,
                    candidate.variant_id, incumbent.variant_id if incumbent else "the fallback", self.slot_s,
                    "the model's step" if self._clocks else "the key's time per call")
        return trial

    def end(self, key: str) -> Trial | None:
        """Stop the key's canary (the registry decided, or moved on); the table keeps whatever it
        holds until the caller installs what the registry names now."""
        with self._lock:
            return self.trials.pop(key, None)

    def close(self) -> None:
        """Stop every canary here (the runtime is closing: the ops serve their fallbacks)."""
        with self._lock:
            self.trials.clear()

    # ---- slots --------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Change slots that are due; from the background thread, unless steps drive the slots."""
        with self._lock:
            if self._clocks:
                return
            now = self.clock() if now is None else now
            for trial in list(self.trials.values()):
                self._switch(trial, now)

    def _switch(self, trial: Trial, now: float) -> None:
        slot = int((now - trial.started) // self.slot_s)
        if slot == trial.slot:
            return
        key = trial.key
        if trial.slot >= 0 and self.dispatcher.table.get(key) is not trial.installed:
            # the dispatcher dropped the variant after it failed on a call (or someone else swapped
            # the key): this process can no longer compare; it serves what the table holds
            del self.trials[key]
            self.broken.append((key, "the dispatch table no longer holds the arm the canary installed"))
            log.error("canary: %s stopped here: the table no longer holds %s", key,
                      trial.installed.variant_id if trial.installed else "the fallback")
            return
        trial.slot = slot
        served = trial.candidate if arm_for_slot(slot) == "candidate" else trial.incumbent
        if served is None:
            self.dispatcher.remove(key)
        else:
            self.dispatcher.install(key, served)
        trial.installed = served

    # ---- measures -----------------------------------------------------------------------------

    def step(self, kind: str, now: float | None = None) -> None:
        """A model step starts: the previous step's period (start to this start) is its time; then
        the slots that are due change, so this step runs wholly on one arm."""
        with self._lock:
            now = self.clock() if now is None else now
            if self._last is not None:
                start, last_kind, arms = self._last
                for key, (window, arm) in arms.items():
                    trial = self.trials.get(key)
                    if trial is not None and now > start:
                        trial.steps.append(Step(window, arm, last_kind, (now - start) * 1e6))
            if not self.trials:
                self._last = (now, kind, {})
                return
            for trial in list(self.trials.values()):
                self._switch(trial, now)
            self._last = (now, kind, {key: (t.window, arm_for_slot(t.slot)) for key, t in self.trials.items()})

    def on_sample(self, op: str, dtype: str, bucket: str, variant_id: str | None, time_us: float) -> None:
        """A timed call of a key (the window aggregator's hook): its time, for the key measure."""
        if self._clocks or not self.trials or time_us <= 0:
            return
        key = self.dispatcher.key(op, dtype, bucket)
        with self._lock:
            trial = self.trials.get(key)
            arm = trial.arm(variant_id) if trial is not None and trial.slot >= 0 else None
            if arm is not None:
                trial.steps.append(Step(trial.window, arm, key, time_us))

    # ---- reports ------------------------------------------------------------------------------

    def reports(self) -> list[CanaryReport]:
        """One report per key with the windows completed since the last call (both slots past)."""
        out = []
        with self._lock:
            measure = self.measure
            for trial in self.trials.values():
                done = [s for s in trial.steps if s.window < trial.window]
                if not done:
                    continue
                trial.steps = [s for s in trial.steps if s.window >= trial.window]
                windows = [CanaryWindow(step_kind=p.step_kind, window=p.window, candidate_us=p.candidate_us,
                                        incumbent_us=p.incumbent_us, candidate_steps=p.candidate_steps,
                                        incumbent_steps=p.incumbent_steps) for p in summarise(done, self.source)]
                if windows:
                    out.append(CanaryReport(
                        key=KernelKey.parse(trial.key), variant_id=trial.candidate.variant_id,
                        incumbent_variant_id=trial.incumbent.variant_id if trial.incumbent else None,
                        revision=trial.revision, source=self.source, measure=measure, windows=windows))
        return out
