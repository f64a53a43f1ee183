"""The observing runtime: a background thread with its own asyncio loop that publishes each window
of calls on kernel.stats, follows the registry, hot-swapping deployed variants into dispatch, and
runs this process's side of the canaries: their slots and their reports on canary.report.

Neither a missing server nor a missing stream ever blocks or fails the workload: windows wait in a
bounded buffer until the stream exists (the services declare it; the runtime never does)."""
import asyncio
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import nats
from nats.errors import Error as NatsError

from observer.sdk.canary import CanaryController
from observer.sdk.dispatch import Dispatcher
from observer.sdk.hotswap import DeployRecord, HotSwap, Withdrawal
from shared import subjects
from shared.schemas import CanaryReport, KernelStats
from shared.settings import nats_servers
from shared.windows import WindowAggregator

log = logging.getLogger("kernelloop.observer")


class Runtime:
    """Made by observe(); one per process. Public: serving(), deploys, refused, registry_synced,
    window_listeners, submit(), close()."""

    def __init__(self, dispatcher: Dispatcher, nats_url: str, source: str, window_s: float,
                 state_dir: Path, max_buffered: int = 10_000, replicas: int = 1, canary_slot_s: float = 1.0):
        self.dispatcher = dispatcher
        self.nats_url = nats_url
        self.window_s = window_s
        self.cache_dir = Path(state_dir) / "variants"
        self.canary = CanaryController(dispatcher, source, canary_slot_s)
        self.hotswap = HotSwap(dispatcher, self.cache_dir, replicas, self.canary)
        # called from the background thread with each window's stats, e.g. by the demo's display
        self.window_listeners: list[Callable[[list[KernelStats]], None]] = []
        self.windows = WindowAggregator(dispatcher.hardware, source, start=time.time())
        self.windows.on_sample = self.canary.on_sample
        self._canary_reports: deque[CanaryReport] = deque(maxlen=1000)  # waiting for the server
        self.canary_reports_sent = 0
        self._buffer: deque[KernelStats] = deque()
        self._submitted: deque[KernelStats] = deque()  # from other threads (the sampling observer)
        self._max_buffered = max_buffered
        self._dropped = 0  # windows dropped from a full buffer since the last successful publish
        self._stop = asyncio.Event()  # binds to the background loop when that first waits on it
        self._loop = asyncio.new_event_loop()
        self._nc = None
        self._close_timeout = 5.0
        self._thread = threading.Thread(target=self._run, name="kernelloop-observer", daemon=True)
        self._closed = False

    def start(self) -> "Runtime":
        self.dispatcher.cache_dir = self.cache_dir
        self.dispatcher.windows = self.windows
        self._thread.start()
        return self

    @property
    def deploys(self) -> list[DeployRecord]:
        """Registry entries swapped in here, oldest first."""
        return self.hotswap.deploys

    @property
    def withdrawals(self) -> list[Withdrawal]:
        """Variants the registry took back from serving here (rollbacks, deleted keys), oldest first."""
        return self.hotswap.withdrawals

    @property
    def refused(self) -> list[tuple[str, str]]:
        """(registry key, reason) for each entry refused here."""
        return self.hotswap.refused

    @property
    def registry_synced(self) -> threading.Event:
        """Set once the registry's current values are applied."""
        return self.hotswap.synced

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def canaries(self) -> list[str]:
        """The keys served by turns here now, each in its canary."""
        return sorted(self.canary.trials)

    def serving(self, op: str, dtype: str, bucket: str) -> str | None:
        """The variant that serves (op, dtype, bucket) here now; None for the op's fallback."""
        return self.dispatcher.serving(self.dispatcher.key(op, dtype, bucket))

    def submit(self, stats: list[KernelStats]) -> None:
        """Publish stats made elsewhere (profiled steps) with the next window; from any thread."""
        self._submitted.extend(stats)

    def close(self, timeout: float = 5.0) -> None:
        """Publish the last window (waiting up to `timeout` for the server), then stop following
        the registry: from here on the ops serve their fallbacks."""
        if self._closed:
            return
        self._closed = True
        self._close_timeout = timeout
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout + 5)
        self.dispatcher.windows = None
        self.canary.close()
        self.dispatcher.table.clear()

    # ---- the background loop ------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            # the client's own helper tasks (ordered consumers' heartbeat checks) end here too
            left = asyncio.all_tasks(self._loop)
            for task in left:
                task.cancel()
            if left:
                self._loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            self._loop.close()

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._connect()), asyncio.create_task(self._publish_windows()),
                 asyncio.create_task(self._follow_registry()), asyncio.create_task(self._run_canaries())]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._flush()
        deadline = time.monotonic() + self._close_timeout
        while self._buffer and self._nc is not None and time.monotonic() < deadline:
            if not await self._send_buffered():
                await asyncio.sleep(0.2)
        if self._buffer:
            log.warning("kernel.stats: dropping %d unpublished windows at close (no server or stream)",
                        len(self._buffer))
        if self._nc is not None:
            try:
                await asyncio.wait_for(self._nc.close(), 5.0)
            except Exception as e:
                log.debug("nats: close: %s", e)

    async def _connect(self) -> None:
        async def quiet(e: Exception) -> None:
            log.debug("nats: %s", e)

        log.info("observing: connecting to %s (the workload does not wait for it)", self.nats_url)
        while True:
            try:
                self._nc = await nats.connect(nats_servers(self.nats_url), connect_timeout=2,
                                              reconnect_time_wait=1, max_reconnect_attempts=-1, error_cb=quiet,
                                              name="kernelloop-sdk", reconnected_cb=self._reconnected)
                log.info("observing: connected to %s", self.nats_url)
                return
            except Exception as e:  # no server yet: the workload goes on, the windows wait
                log.info("observing: no NATS at %s yet (%s); retrying", self.nats_url, e)
                await asyncio.sleep(2.0)

    async def _reconnected(self) -> None:
        log.info("observing: reconnected to %s", self.nats_url)
        self.hotswap.rewatch.set()

    def _flush(self) -> None:
        self.dispatcher.resolve_timings()
        window = self.windows.flush(time.time())
        while self._submitted:
            window.append(self._submitted.popleft())
        for listener in self.window_listeners:
            try:
                listener(window)
            except Exception:
                log.exception("a window listener failed")
        for stats in window:
            if len(self._buffer) >= self._max_buffered:
                self._buffer.popleft()
                if not self._dropped:
                    log.warning("kernel.stats: buffer full (%d windows); dropping the oldest until the "
                                "stream takes them", self._max_buffered)
                self._dropped += 1
            self._buffer.append(stats)

    async def _publish_windows(self) -> None:
        waiting_logged = False
        while True:
            await asyncio.sleep(self.window_s)
            self._flush()
            if await self._send_buffered():
                if self._dropped:
                    log.warning("kernel.stats: publishing again; %d windows were dropped meanwhile", self._dropped)
                waiting_logged, self._dropped = False, 0
            elif self._buffer and not waiting_logged:
                log.info("kernel.stats: no server or stream %s yet; %d windows buffered",
                         subjects.STREAM_NAME, len(self._buffer))
                waiting_logged = True

    async def _send_buffered(self) -> bool:
        """Publish buffered windows oldest first; False when the server or stream did not take one."""
        return await self._drain(subjects.KERNEL_STATS, self._buffer)

    async def _drain(self, subject: str, queue: deque) -> bool:
        """Publish a queue's events oldest first, each removed once acked; False when the server or
        stream did not take one (it and the rest stay queued)."""
        if self._nc is None or not self._nc.is_connected:
            return False
        js = self._nc.jetstream()
        while queue:
            event = queue[0]
            try:
                await js.publish(subject, event.model_dump_json().encode(), timeout=2.0,
                                 stream=subjects.STREAM_NAME, headers={"Nats-Msg-Id": event.event_id})
            except (NatsError, asyncio.TimeoutError):
                return False  # kept: the same event id makes a retry after a lost ack harmless
            queue.popleft()
        return True

    async def _run_canaries(self) -> None:
        """Change the canaries' slots when due (unless steps drive them) and report their completed
        windows every two slots. Nothing here waits on the workload, nor it on this."""
        slot_s = self.canary.slot_s
        tick_s = min(0.25, slot_s / 8)
        next_report = time.monotonic() + 2 * slot_s
        while True:
            await asyncio.sleep(tick_s)
            if not self.canary.trials and not self._canary_reports:
                continue
            self.dispatcher.resolve_timings()  # device timings of the slot ending: into its own window
            self.canary.tick()
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + 2 * slot_s
                self._canary_reports.extend(self.canary.reports())
                await self._send_canary_reports()

    async def _send_canary_reports(self) -> None:
        queued = len(self._canary_reports)
        await self._drain(subjects.CANARY_REPORT, self._canary_reports)
        self.canary_reports_sent += queued - len(self._canary_reports)

    async def _follow_registry(self) -> None:
        while self._nc is None:
            await asyncio.sleep(0.1)
        await self.hotswap.follow(self._nc)
