"""Following the registry: each entry for this hardware is verified (its source must hash to its
variant id), loaded and swapped into dispatch while the workload runs; a deleted key goes back to
the op's fallback. Runs on the runtime's background loop."""
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


class HotSwap:
    def __init__(self, dispatcher: Dispatcher, cache_dir: Path, replicas: int = 1):
        self.dispatcher = dispatcher
        self.replicas = replicas  # the registry's, should the workload be the first to declare it
        self.cache_dir = cache_dir
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
        watcher = await kv.watch(f"{self.dispatcher.hardware}.>")
        seen: set[str] = set()
        try:
            while not self.rewatch.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                if entry is None:  # the end of the current values: what was not among them is gone
                    for key in set(self.dispatcher.table) - seen:
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

    def undeploy(self, key: str) -> None:
        self._revisions.pop(key, None)
        serving = self.dispatcher.serving(key)
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
        replaced = self.dispatcher.serving(key)
        if replaced == entry.variant_id:
            return
        with tracer.start_as_current_span("swap", context=_campaign_context(entry.trace_id)) as span:
            span.set_attributes({"campaign_id": entry.campaign_id, "op": kernel_key.op,
                                 "kernel_key": key, "variant_id": entry.variant_id})
            try:
                launch = await asyncio.to_thread(verify_and_load, entry, self.cache_dir)
                await asyncio.to_thread(_warm_up, launch, kernel_key)
            except Exception as e:
                span.set_attribute("status", "rejected")
                return self._refuse(key, f"variant {entry.variant_id}: {e}")
            self.dispatcher.install(key, Served(entry.variant_id, launch, entry))
            span.set_attribute("status", "ok")
        now = datetime.now(timezone.utc)
        if takes_back(replaced, entry, {d.variant_id for d in self.deploys if d.key == key}):
            self.withdrawals.append(Withdrawal(key, replaced, entry.variant_id, f"rolled back ({entry.approved_by})",
                                               now))
        self.deploys.append(DeployRecord(key, entry.variant_id, entry.speedup, entry.campaign_id,
                                         entry.trace_id, revision, now))
        log.warning("registry: %s now served by %s (%.2fx, campaign %s)",
                    key, entry.variant_id, entry.speedup, entry.campaign_id)

    def _refuse(self, key: str, reason: str) -> None:
        self.refused.append((key, reason))
        log.error("registry: refusing %s: %s", key, reason)
