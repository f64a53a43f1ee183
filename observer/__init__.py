"""The observer: the in-process SDK a workload imports (observer.sdk), the trace-ingestion logic
(observer.ingest) behind the service that turns PyTorch profiler traces into kernel.stats
(observer.app), and the demo workloads (observer.demos)."""
