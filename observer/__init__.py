"""The observer: the in-process SDK a workload imports (observer.sdk), and the service that turns
PyTorch profiler traces into kernel.stats (observer.app)."""
