"""`python -m detector`: run the detector service against the NATS named by NATS_URL."""
import asyncio
import logging

from detector.app import build_app
from shared.settings import Settings
from shared.telemetry import setup_tracing


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    provider = setup_tracing("detector", settings.traces_dir, settings.otel_exporter_otlp_endpoint)
    app = build_app(settings, provider)
    asyncio.run(app.run())


if __name__ == "__main__":
    main()
