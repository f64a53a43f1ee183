"""Subject, stream, bucket and durable-consumer names: the wiring between the five services."""

STREAM_NAME = "KERNELLOOP"

KERNEL_STATS = "kernel.stats"
USAGE_CHANGED = "usage.changed"
HYPOTHESIS = "hypothesis"
VARIANT_READY = "variant.ready"
BENCH_RESULT = "bench.result"
REFINE = "refine"
DEPLOY = "deploy"
PROFILER_TRACE = "profiler.trace"  # raw PyTorch profiler traces for the observer service

ALL = [KERNEL_STATS, USAGE_CHANGED, HYPOTHESIS, VARIANT_READY, BENCH_RESULT, REFINE, DEPLOY, PROFILER_TRACE]

# JetStream key-value buckets.
REGISTRY_BUCKET = "kernelloop-registry"    # <hardware>.<op>.<dtype>.<bucket> -> RegistryEntry
CAMPAIGN_BUCKET = "kernelloop-campaigns"   # campaign_id -> deployer's round state
# Every creator of a bucket uses these histories: the server refuses a re-declaration that differs.
REGISTRY_HISTORY = 16  # deploys kept per key, for rollback
CAMPAIGN_HISTORY = 1

# Durable consumer names, one per consuming stage; replicas of a stage share it (a work queue).
DURABLE = {
    KERNEL_STATS: "detector-stats",
    USAGE_CHANGED: "detector-hypothesis",
    HYPOTHESIS: "generator-hypothesis",
    REFINE: "generator-refine",
    VARIANT_READY: "benchmarker",
    BENCH_RESULT: "deployer",
    PROFILER_TRACE: "observer-traces",
}
