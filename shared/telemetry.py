"""Tracing set-up: spans go to a JSON-lines file under the state folder, or over OTLP when
OTEL_EXPORTER_OTLP_ENDPOINT is set. One call per process, at start-up."""
import json
import os
import threading
from pathlib import Path
from typing import Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class JsonLinesExporter(SpanExporter):
    """Appends one JSON object per finished span; `kernelloop trace` reads these files back."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_to_dict(s), default=str) for s in spans]
        with self._lock, open(self.path, "a") as f:
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def span_to_dict(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "service": span.resource.attributes.get("service.name", "?"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [f"{link.context.trace_id:032x}" for link in span.links],
    }


def setup_tracing(service: str, traces_dir: Path, otlp_endpoint: str | None = None) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.rstrip("/")
        exporter: SpanExporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")
    else:
        exporter = JsonLinesExporter(Path(traces_dir) / f"{service}-{os.getpid()}.jsonl")
    # Short delay: the CLI reads the files while the loop runs.
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    return provider


def setup_metrics(service: str, otlp_endpoint: str | None = None, reader=None):
    """The meter provider of a service: OTLP/HTTP to otlp_endpoint every 15 s when one is given (a
    metrics backend, e.g. an OpenTelemetry Collector or Prometheus' OTLP receiver; Jaeger takes
    traces only), or to the given reader (tests); instruments are cheap no-ops without either."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    readers = [reader] if reader is not None else []
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=f"{otlp_endpoint.rstrip('/')}/v1/metrics")
        readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=15_000))
    provider = MeterProvider(metric_readers=readers, resource=Resource.create({"service.name": service}))
    if reader is None:
        metrics.set_meter_provider(provider)
    return provider


class LoopMetrics:
    """The loop's counters, named once: campaigns by event, variants by status, deploys, and the
    benchmark queue (variants waiting, and how long the oldest has waited)."""

    def __init__(self, meter_provider=None):
        from opentelemetry import metrics

        meter = (meter_provider or metrics.get_meter_provider()).get_meter("kernelloop")
        self.campaigns = meter.create_counter(
            "kernelloop.campaigns", unit="{campaign}",
            description="campaign events: started, deployed, exhausted, held for approval, rejected")
        self.variants = meter.create_counter("kernelloop.variants", unit="{variant}",
                                             description="benchmarked variants by status")
        self.deploys = meter.create_counter("kernelloop.deploys", unit="{deploy}",
                                            description="registry writes by who approved (gate, person, rollback)")
        self.queue = meter.create_gauge("kernelloop.benchmark.queue", unit="{variant}",
                                        description="variant.ready events no benchmarker has taken yet")
        self.queue_lag = meter.create_gauge("kernelloop.benchmark.queue_lag", unit="s",
                                            description="age of the oldest variant.ready not yet taken")


def read_spans(traces_dir: Path) -> list[dict]:
    spans = []
    for path in sorted(Path(traces_dir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    spans.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash; the rest of the file still counts
    return spans
