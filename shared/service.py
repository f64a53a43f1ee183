"""`python -m <service>`: the one start-up path of every service. Settings are read once here,
tracing is set up, and the app runs until SIGTERM or Ctrl-C, flushing its last spans on the way out."""
import asyncio
import importlib
import logging

from shared.interpreter import use_interpreter_without_gpu


def run_service(name: str) -> None:
    use_interpreter_without_gpu()  # before the service imports anything that defines Triton kernels
    from shared.broker import use_replicas
    from shared.ops import use_user_ops
    from shared.settings import Settings
    from shared.telemetry import setup_metrics, setup_tracing

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    use_replicas(settings.nats_replicas)  # before the app declares its stream and buckets
    use_user_ops(settings.user_ops_dir)  # ops added with `kernelloop op add`, for every get_op
    provider = setup_tracing(name, settings.traces_dir, settings.otel_exporter_otlp_endpoint)
    meters = setup_metrics(name, settings.otel_exporter_otlp_metrics_endpoint)
    app = importlib.import_module(f"{name}.app").build_app(settings, provider)
    try:
        asyncio.run(app.run())
    finally:
        provider.shutdown()
        meters.shutdown()
