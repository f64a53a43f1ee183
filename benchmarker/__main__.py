"""`python -m benchmarker`: run the benchmarker service against NATS_URL."""
import asyncio
import logging

from shared.settings import Settings
from shared.telemetry import setup_tracing

from benchmarker.app import build_app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    tracer_provider = setup_tracing("benchmarker", settings.traces_dir, settings.otel_exporter_otlp_endpoint)
    app = build_app(settings, tracer_provider)
    asyncio.run(app.run())


if __name__ == "__main__":
    main()
