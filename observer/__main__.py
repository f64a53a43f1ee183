"""`python -m observer`: run the observer service (profiler traces -> kernel.stats) against the
NATS named by NATS_URL."""
import asyncio
import logging

from observer.app import build_app
from shared.settings import Settings
from shared.telemetry import setup_tracing


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    provider = setup_tracing("observer", settings.traces_dir, settings.otel_exporter_otlp_endpoint)
    app = build_app(settings, provider)
    try:
        asyncio.run(app.run())
    finally:
        provider.shutdown()  # flush the last spans


if __name__ == "__main__":
    main()
