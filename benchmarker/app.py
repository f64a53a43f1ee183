"""The benchmarker service: variant.ready in, bench.result out. Every replica shares one durable
consumer (a work queue), so each variant is benchmarked by one worker; run one replica per GPU."""
import asyncio
import logging
from pathlib import Path

from faststream import FastStream
from opentelemetry import trace
from opentelemetry.trace import Tracer, TracerProvider

from shared import subjects
from shared.broker import durable_subscriber, make_broker, publish, replicas, stream
from shared.schemas import BenchResult, Hardware, VariantReady
from shared.settings import Settings

from benchmarker.worker import MEMORY_GB, Stage, abort_all, benchmark, prepare

log = logging.getLogger("kernelloop.benchmarker")


def build_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    broker, app = make_broker(settings.nats_url, tracer_provider)
    broker.publisher(subjects.BENCH_RESULT, stream=stream())  # declared for the AsyncAPI document
    tracer = trace.get_tracer("kernelloop.benchmarker", tracer_provider=tracer_provider)
    cache_dir = settings.state_dir / "variants"
    recorded: set[str] = set()  # cards whose measured peaks this process has put in the hardware bucket

    @durable_subscriber(broker, subjects.VARIANT_READY)  # heartbeats hold the message while it runs
    async def on_variant_ready(variant: VariantReady) -> None:
        result = await benchmark_traced(tracer, variant, settings.bench_reps, settings.bench_timeout_s, cache_dir,
                                        settings.bench_memory_gb)
        await publish(broker, subjects.BENCH_RESULT, result)
        measured = result.hardware
        if measured.copy_gbps is not None and measured.device_id not in recorded:
            try:
                kv = await broker.key_value(subjects.HARDWARE_BUCKET, history=subjects.HARDWARE_HISTORY,
                                            replicas=replicas())
                if await record_peaks(kv, measured):
                    recorded.add(measured.device_id)
            except Exception as e:  # the result is out; a missed note of the peaks must not redo it
                log.warning("could not record the measured peaks of %s: %s", measured.key, e)

    app.on_startup(prepare)
    app.on_shutdown(abort_all)
    return app


async def record_peaks(kv, measured: Hardware) -> bool:
    """Put what a worker measured on its GPU under the hardware key, for the hypothesis stage's
    roofline; False (nothing written) where nothing was measured, as on the interpreter."""
    if measured.copy_gbps is None or measured.matmul_tflops is None:
        return False
    await kv.put(measured.key, measured.model_dump_json().encode())
    log.info("measured peaks of %s (%s): %.0f GB/s copy, %.0f TFLOP/s bf16 matmul", measured.key, measured.name,
             measured.copy_gbps, measured.matmul_tflops)
    return True


async def benchmark_traced(tracer: Tracer, variant: VariantReady, reps: int, timeout_s: float,
                           cache_dir: Path, memory_gb: float = MEMORY_GB) -> BenchResult:
    """benchmark() off the event loop (so the connection keeps heart-beating), under one span with
    the worker's stages as child spans placed at the times the worker reported."""
    key = variant.campaign.key
    attributes = {"campaign_id": variant.campaign.campaign_id, "op": key.op, "kernel_key": str(key),
                  "bucket": key.bucket, "variant_id": variant.variant_id, "strategy": variant.strategy,
                  "round": variant.round}
    with tracer.start_as_current_span("benchmark", attributes=attributes) as span:
        stages: list[Stage] = []
        result = await asyncio.to_thread(benchmark, variant, reps, timeout_s, cache_dir, stages.append, memory_gb)
        for stage in stages:
            # Spans cannot cross the process boundary; the worker's stage times become spans here.
            child = tracer.start_span(stage.name, start_time=stage.start_ns, attributes={**attributes, **stage.attributes})
            child.end(end_time=stage.end_ns)
            span.add_event(f"{stage.name} done", {"duration_ms": (stage.end_ns - stage.start_ns) / 1e6})
        span.set_attribute("status", result.status)
        if result.weighted_speedup is not None:
            span.set_attributes({"speedup": result.weighted_speedup, "speedup_ci_low": result.speedup_ci_low,
                                 "speedup_ci_high": result.speedup_ci_high})
        if result.error:
            span.set_attribute("error", result.error[:1000])
    _log_result(variant, result)
    return result


def _log_result(variant: VariantReady, result: BenchResult) -> None:
    key = variant.campaign.key
    if result.hardware.key != key.hardware:
        log.warning("variant %s was measured on %s but the campaign's key is for %s",
                    variant.variant_id, result.hardware.key, key.hardware)
    if result.status == "ok":
        log.info("variant %s of %s: %.3fx [%.3f, %.3f] vs %s", variant.variant_id, key, result.weighted_speedup,
                 result.speedup_ci_low, result.speedup_ci_high, result.incumbent)
    elif result.status == "rejected" and result.error and result.error.startswith("campaign.key"):
        log.error("variant %s: bad event, %s", variant.variant_id, result.error)
    else:
        log.info("variant %s of %s: %s: %s", variant.variant_id, key, result.status, result.error)
