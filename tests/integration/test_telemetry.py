"""Spans leave over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, and to the file exporter otherwise."""
import http.server
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMIT = """
import sys
from pathlib import Path
from shared.telemetry import setup_tracing
provider = setup_tracing("probe", Path(sys.argv[1]), sys.argv[2] or None)
from opentelemetry import trace
with trace.get_tracer("t").start_as_current_span("hypothesise") as span:
    span.set_attribute("campaign_id", "c42")
provider.shutdown()
"""


def _emit(traces_dir: Path, endpoint: str = "") -> None:
    subprocess.run([sys.executable, "-c", EMIT, str(traces_dir), endpoint], cwd=ROOT, check=True, timeout=60)


def test_spans_go_over_otlp_http_when_an_endpoint_is_set(tmp_path):
    received = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _emit(tmp_path, f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert [path for path, _ in received] == ["/v1/traces"]
    assert b"hypothesise" in received[0][1] and b"c42" in received[0][1]
    assert not list(tmp_path.glob("*.jsonl")), "no file export when OTLP is configured"


def test_spans_go_to_a_jsonl_file_by_default(tmp_path):
    from shared.telemetry import read_spans

    _emit(tmp_path)
    spans = read_spans(tmp_path)
    assert [(s["name"], s["service"], s["attributes"]["campaign_id"]) for s in spans] == [("hypothesise", "probe", "c42")]
