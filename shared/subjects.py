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
DEPLOY_PENDING = "deploy.pending"  # a winner held for a person's approval
DEPLOY_APPROVAL = "deploy.approval"  # a person's approve or reject of a pending deploy
CANARY_REPORT = "canary.report"  # a workload's A/B of a canary deploy: step times per arm and window

# A message a stage cannot use goes to dead.<its subject>, with the reason (shared/broker.py).
DEAD_LETTER_PREFIX = "dead"

ALL = [KERNEL_STATS, USAGE_CHANGED, HYPOTHESIS, VARIANT_READY, BENCH_RESULT, REFINE, DEPLOY, PROFILER_TRACE,
       DEPLOY_PENDING, DEPLOY_APPROVAL, CANARY_REPORT, f"{DEAD_LETTER_PREFIX}.>"]

# JetStream key-value buckets.
REGISTRY_BUCKET = "kernelloop-registry"    # <hardware>.<op>.<dtype>.<bucket> -> RegistryEntry
CAMPAIGN_BUCKET = "kernelloop-campaigns"   # campaign_id -> deployer's round state
# Every creator of a bucket uses these histories: the server refuses a re-declaration that differs.
REGISTRY_HISTORY = 16  # deploys kept per key, for rollback
CAMPAIGN_HISTORY = 1
CANARY_BUCKET = "kernelloop-canaries"      # <hardware> -> the deployer's canary on it (CanaryState)
CANARY_HISTORY = 1
PROGRAM_BUCKET = "kernelloop-programs"     # generator's program database, campaigns and bandit
PROGRAM_HISTORY = 1
OPS_BUCKET = "kernelloop-ops"              # user-added ops (KernelBench-format source) by name
OPS_HISTORY = 4
# The generator's second consumer of bench.result: verdicts into its program database.
GENERATOR_RESULTS_DURABLE = "generator-results"
# The detector's campaign guard: kernel key -> the campaign started for it (no second while in flight).
DETECTOR_BUCKET = "kernelloop-detector"
DETECTOR_HISTORY = 1
# What each kind of GPU really does: <hardware> -> the Hardware a benchmarker measured on it (copy
# bandwidth, bf16 matmul rate), for the hypothesis stage's roofline.
HARDWARE_BUCKET = "kernelloop-hardware"
HARDWARE_HISTORY = 1
# The deployer's second consumer of usage.changed: regressions after a deploy, answered by a rollback.
REGRESSION_DURABLE = "deployer-regression"
# Profiler traces: an object-store inbox the observer ingests and empties, and what it made of each
# trace (TraceSummary, keyed <hardware>.<source>) for `kernelloop status`.
TRACE_OBJECT_BUCKET = "kernelloop-traces"
TRACE_SUMMARY_BUCKET = "kernelloop-trace-summaries"
TRACE_SUMMARY_HISTORY = 1

# Durable consumer names, one per consuming stage; replicas of a stage share it (a work queue).
DURABLE = {
    KERNEL_STATS: "detector-stats",
    USAGE_CHANGED: "detector-hypothesis",
    HYPOTHESIS: "generator-hypothesis",
    REFINE: "generator-refine",
    VARIANT_READY: "benchmarker",
    BENCH_RESULT: "deployer",
    PROFILER_TRACE: "observer-traces",
    DEPLOY_APPROVAL: "deployer-approval",
    CANARY_REPORT: "deployer-canary",
}
