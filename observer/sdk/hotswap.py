"""Following the registry: each entry for this hardware is verified (its source must hash to its
variant id), loaded and swapped into dispatch while the workload runs; a deleted key goes back to
the op's fallback. A canary entry is served by turns with the variant it replaces (observer/sdk/
canary.py) until the registry promotes it (it goes on alone) or rolls it back. Runs on the
runtime's background loop."""
import asyncio
import logging
import random
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import nats
import torch
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from pydantic import ValidationError

from observer.sdk.canary import CanaryController, Trial
from observer.sdk.dispatch import Dispatcher, Served, verify_and_load
from shared import subjects
from shared.registry import takes_back
from shared.ops import get_op, torch_dtype
from shared.schemas import KernelKey, RegistryEntry

log = logging.getLogger("kernelloop.observer")
tracer = trace.get_tracer("kernelloop.observer")


@dataclass(frozen=True)
class DeployRecord:
    """A registry entry this process swapped in."""

    key: str
    variant_id: str
    speedup: float
    campaign_id: str
    trace_id: str | None
    revision: int
    time: datetime
    stage: str = "promoted"  # canary: served by turns with what it replaces; promoted: alone
    step_speedup: float | None = None  # what its canary measured, once promoted after one


@dataclass(frozen=True)
class Withdrawal:
    """A variant that stopped serving here because the registry took it back: a rollback (to the
    variant before it, or to the fallback) or a deleted key. Replacing it with a newer deploy is not
    one."""

    key: str
    variant_id: str
    replaced_by: str | None  # None: the op's fallback
    why: str
    time: datetime


def _campaign_context(trace_id: str | None):
    """A context inside the campaign's trace, so the swap here shows as the loop's last step (the
    parent, the deployer's span, is known only by trace id: the swap shows as a root of that trace)."""
    try:
        parent = SpanContext(trace_id=int(trace_id, 16), span_id=random.getrandbits(64) | 1, is_remote=True,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED))
    except (TypeError, ValueError):
        return None
    return trace.set_span_in_context(NonRecordingSpan(parent)) if parent.is_valid else None


def _warm_up(launch, key: KernelKey) -> None:
    """Compile the variant here, off the workload's path, before it serves. Without CUDA there is
    nothing to compile, and an interpreted run would only cost time."""
    if not torch.cuda.is_available():
        return
    op = get_op(key.op)
    launch(*op.make_inputs(op.example_shapes(key.bucket)[0], torch_dtype(key.dtype), "cuda", seed=0))
    torch.cuda.synchronize()


KEEP_LOADED = 64  # launchers kept by variant id, so a canary's incumbent is not loaded again


class HotSwap:
    def __init__(self, dispatcher: Dispatcher, cache_dir: Path, replicas: int = 1,
                 canary: CanaryController | None = None):
        self.dispatcher = dispatcher
        self.replicas = replicas  # the registry's, should the workload be the first to declare it
        self.cache_dir = cache_dir
        self.canary = canary  # None: canary entries are served alone, like promoted ones
        self._loaded: dict[str, Served] = {}  # variant id -> a launcher loaded here
        self._kv = None  # the registry bucket, for a canary's incumbent this process never loaded
        self.deploys: list[DeployRecord] = []
        self.refused: list[tuple[str, str]] = []  # (registry key, reason)
        self.withdrawals: list[Withdrawal] = []
        self.synced = threading.Event()  # set once the registry's current values are applied
        self.rewatch = asyncio.Event()  # set after a reconnect: a watch may miss what happened meanwhile
        self._revisions: dict[str, int] = {}  # key -> the last revision handled

    async def follow(self, nc: nats.NATS) -> None:
        """Watch this hardware's keys for good, watching again after errors and reconnects."""
        while True:
            self.rewatch.clear()
            try:
                await self._watch(nc)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a lost connection, a bucket not there yet: watch again
                log.info("registry: watch interrupted (%s); watching again", e)
                await asyncio.sleep(1.0)

    async def _watch(self, nc: nats.NATS) -> None:
        js = nc.jetstream()
        try:
            kv = await js.key_value(subjects.REGISTRY_BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(bucket=subjects.REGISTRY_BUCKET,
                                                          history=subjects.REGISTRY_HISTORY, replicas=self.replicas))
        self._kv = kv
        watcher = await kv.watch(f"{self.dispatcher.hardware}.>")
        seen: set[str] = set()
        try:
            while not self.rewatch.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                if entry is None:  # the end of the current values: what was not among them is gone
                    canaries = set(self.canary.trials) if self.canary is not None else set()
                    for key in (set(self.dispatcher.table) | canaries) - seen:
                        self.undeploy(key)
                    self.synced.set()
                elif not hasattr(entry, "key"):  # the watcher was stopped under us
                    return
                elif entry.operation in ("DEL", "PURGE"):
                    self.undeploy(entry.key)
                else:
                    seen.add(entry.key)
                    await self.deploy(entry.key, entry.value, entry.revision)
        finally:
            await asyncio.shield(watcher.stop())

    def _end_canary(self, key: str) -> Trial | None:
        return self.canary.end(key) if self.canary is not None else None

    def undeploy(self, key: str) -> None:
        self._revisions.pop(key, None)
        trial = self._end_canary(key)
        serving = trial.candidate.variant_id if trial else self.dispatcher.serving(key)
        if serving is not None:
            log.warning("registry: %s deleted; the fallback serves it again", key)
            self.dispatcher.remove(key)
            self.withdrawals.append(Withdrawal(key, serving, None, "deleted from the registry",
                                               datetime.now(timezone.utc)))

    async def deploy(self, key: str, value: bytes, revision: int) -> None:
        if self._revisions.get(key) == revision:
            return  # a watch started again: this revision was handled already
        self._revisions[key] = revision
        try:
            kernel_key = KernelKey.parse(key)
            get_op(kernel_key.op)
            entry = RegistryEntry.model_validate_json(value)
        except (ValueError, KeyError, ValidationError) as e:
            return self._refuse(key, f"not a registry entry: {e}")
        # Any new revision of the key ends its canary here: promoted, rolled back, or replaced.
        trial = self._end_canary(key)
        replaced = trial.candidate.variant_id if trial else self.dispatcher.serving(key)
        if replaced == entry.variant_id and not (entry.stage == "canary" and self.canary is not None):
            if trial is not None:  # promoted: the candidate goes on serving, alone
                self.dispatcher.install(key, Served(entry.variant_id, trial.candidate.launch, entry))
                self._record(key, entry, revision)
                log.warning("registry: %s promoted %s after its canary", key, entry.variant_id)
            return
        with tracer.start_as_current_span("swap", context=_campaign_context(entry.trace_id)) as span:
            span.set_attributes({"campaign_id": entry.campaign_id, "op": kernel_key.op, "kernel_key": key,
                                 "variant_id": entry.variant_id, "stage": entry.stage})
            try:
                launch = await asyncio.to_thread(verify_and_load, entry, self.cache_dir)
                await asyncio.to_thread(_warm_up, launch, kernel_key)
            except Exception as e:
                span.set_attribute("status", "rejected")
                return self._refuse(key, f"variant {entry.variant_id}: {e}")
            served = Served(entry.variant_id, launch, entry)
            self._keep(served)
            if entry.stage == "canary" and self.canary is not None:
                incumbent = await self._incumbent(key, entry, trial)
                if incumbent is False:
                    log.error("registry: %s: the canary's incumbent %s cannot be loaded here; the candidate "
                              "serves alone", key, entry.previous_variant_id)
                    self.dispatcher.install(key, served)
                else:
                    self.canary.start(key, revision, served, incumbent)
            else:
                self.dispatcher.install(key, served)
            span.set_attribute("status", "ok")
        now = datetime.now(timezone.utc)
        if takes_back(replaced, entry, {d.variant_id for d in self.deploys if d.key == key}):
            self.withdrawals.append(Withdrawal(key, replaced, entry.variant_id, f"rolled back ({entry.approved_by})",
                                               now))
        self._record(key, entry, revision, now)
        log.warning("registry: %s now served by %s (%.2fx, campaign %s%s)", key, entry.variant_id, entry.speedup,
                    entry.campaign_id, ", canary" if entry.stage == "canary" else "")

    def _record(self, key: str, entry: RegistryEntry, revision: int, now: datetime | None = None) -> None:
        self.deploys.append(DeployRecord(key, entry.variant_id, entry.speedup, entry.campaign_id, entry.trace_id,
                                         revision, now or datetime.now(timezone.utc), entry.stage, entry.step_speedup))

    def _keep(self, served: Served) -> None:
        self._loaded.pop(served.variant_id, None)
        self._loaded[served.variant_id] = served
        while len(self._loaded) > KEEP_LOADED:
            self._loaded.pop(next(iter(self._loaded)))

    async def _incumbent(self, key: str, entry: RegistryEntry, trial: Trial | None) -> Served | None | bool:
        """What a canary entry's candidate takes turns with: the variant it replaces (None: the op's
        fallback), found in this process or, for one it never loaded (a workload started during the
        canary), in the key's registry history. False when it cannot be had."""
        previous = entry.previous_variant_id
        if previous is None:
            return None
        table = self.dispatcher.table.get(key)
        for served in (trial.incumbent if trial else None, table, self._loaded.get(previous)):
            if served is not None and served.variant_id == previous:
                return served
        try:
            kept = [e for e in await self._kv.history(key) if e.operation not in ("DEL", "PURGE")]
            earlier = next(RegistryEntry.model_validate_json(e.value) for e in reversed(kept)
                           if RegistryEntry.model_validate_json(e.value).variant_id == previous)
            served = Served(previous, await asyncio.to_thread(verify_and_load, earlier, self.cache_dir), earlier)
        except Exception as e:  # no longer in the kept history, or it fails its checks here
            log.error("registry: %s: incumbent %s: %s", key, previous, e)
            return False
        self._keep(served)
        return served

    def _refuse(self, key: str, reason: str) -> None:
        self.refused.append((key, reason))
        log.error("registry: refusing %s: %s", key, reason)
