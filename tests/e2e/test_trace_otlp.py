"""A campaign as Jaeger would receive it: the five services and the CLI export over OTLP/HTTP to a
collector this test runs, and the campaign's one trace holds every stage span with its attributes."""
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from shared import supervisor

pytestmark = [pytest.mark.e2e, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[2]
FAST = {"KERNELLOOP_BENCH_REPS": "5", "KERNELLOOP_ROUNDS": "1", "KERNELLOOP_VARIANTS_PER_ROUND": "4",
        "TRITON_INTERPRET": "1"}
STAGES = ("hypothesise", "generate", "compile", "check", "time", "decide", "deploy")


class Collector(http.server.ThreadingHTTPServer):
    """Receives OTLP/HTTP protobuf exports; keeps each span as (service, name, trace id, attributes)."""

    def __init__(self):
        self.spans: list[dict] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    for rs in request.resource_spans:
                        service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                attributes = {a.key: json.loads(json.dumps(_value(a.value))) for a in s.attributes}
                                collector.spans.append({"service": service, "name": s.name,
                                                        "trace_id": s.trace_id.hex(), "attributes": attributes,
                                                        "error": s.status.code == 2})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def test_a_campaigns_trace_over_otlp_has_every_stage_span_with_its_attributes(nats_url, tmp_path):
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_port}"
    env = {**os.environ, **FAST, "NATS_URL": nats_url, "KERNELLOOP_STATE_DIR": str(tmp_path),
           "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    loop = supervisor.start(tmp_path, nats_url=nats_url, env={**FAST, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    try:
        loop.wait_ready()
        event = tmp_path / "shift.json"
        event.write_text(json.dumps({"key": {"hardware": "cpu-interpreter", "op": "rmsnorm", "dtype": "float32",
                                             "bucket": "h512-r8"}, "reason": "manual",
                                     "profile": [{"shape": [8, 512], "weight": 1.0}]}))
        published = subprocess.run([sys.executable, "-m", "kernelloop", "publish", "usage.changed", str(event),
                                    "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert published.returncode == 0, published.stderr
        trace_id = json.loads(published.stdout)["trace_id"]
        deadline = time.monotonic() + 420
        while not any(s["name"] == "decide" and s["trace_id"] == trace_id and "decision" in s["attributes"]
                      for s in collector.spans):
            assert not loop.dead(), f"{loop.dead()} exited; logs in {tmp_path / 'logs'}"
            assert time.monotonic() < deadline, "no round closed within 7 minutes"
            time.sleep(2)
        time.sleep(2)  # the deploy (or its refusal) follows the decision
    finally:
        loop.stop()  # each service flushes its last spans on the way out
        collector.shutdown()

    ours = [s for s in collector.spans if s["trace_id"] == trace_id]
    by_name = defaultdict(list)
    for s in ours:
        by_name[s["name"]].append(s)
    decided = [s for s in by_name["decide"] if "decision" in s["attributes"]]
    wanted = STAGES if decided[0]["attributes"]["decision"] == "deploy" else STAGES[:-1]
    assert set(wanted) <= set(by_name), f"stages missing from the trace: {set(wanted) - set(by_name)}"
    assert {"kernelloop-cli", "detector", "generator", "benchmarker", "deployer"} <= {s["service"] for s in ours}
    campaign_id = decided[0]["attributes"]["campaign_id"]
    for name in wanted:
        for s in by_name[name]:
            attributes = s["attributes"]
            assert attributes.get("op") == "rmsnorm", (name, attributes)
            if name != "hypothesise" or "campaign_id" in attributes:
                assert attributes["campaign_id"] == campaign_id, (name, attributes)
    for name in ("compile", "check", "time", "decide"):
        assert all({"variant_id", "strategy"} <= set(s["attributes"]) for s in by_name[name]), name
    assert all("bucket" in s["attributes"] for n in ("hypothesise", "generate", "decide") for s in by_name[n])
    assert all("status" in s["attributes"] for s in by_name["decide"])
    assert any("speedup" in s["attributes"] for s in by_name["decide"])
