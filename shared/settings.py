"""The one Settings class. Read once, in a service's __main__; pure functions take plain arguments."""
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    # A NATS cluster's nodes, comma-separated: a client goes on with another node when one is down.
    nats_url: str = Field("nats://127.0.0.1:4222", alias="NATS_URL")
    # How many cluster nodes keep the stream, each KV bucket and the object store (1 on one server,
    # 3 on a three-node cluster); every process of a deployment must use the same value.
    nats_replicas: int = Field(1, ge=1, le=5, alias="KERNELLOOP_NATS_REPLICAS")
    otel_exporter_otlp_endpoint: str | None = Field(None, alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    # Metrics go to their own backend (Jaeger takes traces only); none are exported while unset.
    otel_exporter_otlp_metrics_endpoint: str | None = Field(None, alias="OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    state_dir: Path = Field(Path(".kernelloop"), alias="KERNELLOOP_STATE_DIR")

    # Observer SDK: a window is published every window_s; a key's first calls, then one in
    # sample_every, are timed (observer/sdk/dispatch.py says why 256: under 1 % of a decode step).
    window_s: float = Field(5.0, alias="KERNELLOOP_WINDOW_S")
    sample_every: int = Field(256, ge=1, alias="KERNELLOOP_SAMPLE_EVERY")
    # observe() waits this long for the registry's current entries, so deployed variants serve the
    # first calls; 0 returns at once (deployed variants then swap in as they load).
    registry_wait_s: float = Field(5.0, ge=0, alias="KERNELLOOP_REGISTRY_WAIT_S")
    # Sampling observer (observe(model) or observe(step_fn)): the profiler records profile_active
    # steps in every profile_every. A profiled step costs tens of ms of host time (recording,
    # export, conversion), so 1 in 1000 keeps a few-ms step's overhead near 1 %
    # (bench/bench_observe_overhead.py) and still profiles every few seconds at serving rates.
    profile_every: int = Field(1000, ge=2, alias="KERNELLOOP_PROFILE_EVERY")
    profile_active: int = Field(1, ge=1, alias="KERNELLOOP_PROFILE_ACTIVE")

    # Detector: a bucket must hold this share of its op's time to be worth a campaign.
    # 3 %: a bucket with 5 % of the time still clears it in a noisy window (bench/bench_detector.py).
    min_time_share: float = Field(0.03, alias="KERNELLOOP_MIN_TIME_SHARE")
    confirm_windows: int = Field(2, alias="KERNELLOOP_CONFIRM_WINDOWS")
    cooldown_s: float = Field(600.0, alias="KERNELLOOP_COOLDOWN_S")
    # Hypothesis stage: below this expected gain (time share x headroom) no campaign starts.
    min_expected_gain: float = Field(0.01, ge=0, le=1, alias="KERNELLOOP_MIN_EXPECTED_GAIN")
    # A restarted detector rebuilds its profile from the kernel.stats of this many seconds back.
    detector_replay_s: float = Field(900.0, ge=0, alias="KERNELLOOP_DETECTOR_REPLAY_S")
    # A campaign the deployer has no verdict on after this long no longer blocks a new one for its key.
    campaign_timeout_s: float = Field(3600.0, gt=0, alias="KERNELLOOP_CAMPAIGN_TIMEOUT_S")

    # Campaign budget handed to the generator.
    rounds: int = Field(3, alias="KERNELLOOP_ROUNDS")
    variants_per_round: int = Field(8, alias="KERNELLOOP_VARIANTS_PER_ROUND")

    # Benchmarker.
    bench_timeout_s: float = Field(300.0, alias="KERNELLOOP_BENCH_TIMEOUT_S")
    bench_reps: int = Field(20, alias="KERNELLOOP_BENCH_REPS")
    # Host memory a benchmark worker may map (RLIMIT_DATA): a variant that blows up dies alone, not
    # the machine. Device memory is bounded by the card; CUDA's address reservations do not count.
    bench_memory_gb: float = Field(16.0, gt=0, alias="KERNELLOOP_BENCH_MEMORY_GB")
    # Benchmarker processes `kernelloop up` starts per device (one work queue): that many pinned to
    # each visible GPU (CUDA_VISIBLE_DEVICES), or that many on a machine without one. Workers on one
    # device compile and check side by side and time one at a time (benchmarker/devicelock.py), so
    # a few per GPU hide compile time without touching the timings. With compose, scale the service.
    bench_workers: int = Field(1, ge=1, le=64, alias="KERNELLOOP_BENCH_WORKERS")

    # Deployer: a candidate must beat the incumbent by this margin at the CI's lower bound.
    min_speedup_margin: float = Field(0.02, alias="KERNELLOOP_MIN_SPEEDUP_MARGIN")
    require_approval: bool = Field(False, alias="KERNELLOOP_REQUIRE_APPROVAL")
    # Who lets a winner deploy: auto (the gate), manual (a person, always), or manual_above (a
    # person when the key carries at least approval_share of its op's time). require_approval
    # is the older spelling of manual and still wins when set.
    deploy_policy: Literal["auto", "manual", "manual_above"] = Field("auto", alias="KERNELLOOP_DEPLOY_POLICY")
    approval_share: float = Field(0.5, ge=0, le=1, alias="KERNELLOOP_APPROVAL_SHARE")
    # Canary: a deploy first serves beside the incumbent, in turns, and is promoted only when the
    # workloads' step time is faster beyond the noise (deployer/canary.py); off, a deploy is final.
    canary: bool = Field(True, alias="KERNELLOOP_CANARY")
    # The longest a canary may run without a verdict (or without any report): then it is withdrawn,
    # since nothing was validated. It holds its hardware's other deploys meanwhile, so not hours.
    canary_max_s: float = Field(180.0, gt=0, alias="KERNELLOOP_CANARY_MAX_S")
    # Workload SDK: how long each arm serves in turn. Two slots make a window, one pair per step
    # kind; 1 s holds tens of steps of a serving model, and a verdict needs 6 windows at least.
    canary_slot_s: float = Field(1.0, gt=0, alias="KERNELLOOP_CANARY_SLOT_S")

    # Generator's LLM strategy: any OpenAI-compatible endpoint; off while no base URL is set.
    openai_base_url: str | None = Field(None, alias="OPENAI_BASE_URL")
    openai_api_key: str | None = Field(None, alias="OPENAI_API_KEY")
    llm_models: str = Field("", alias="KERNELLOOP_LLM_MODELS")  # "model-a:0.7,model-b:0.3", weights optional
    llm_timeout_s: float = Field(120.0, alias="KERNELLOOP_LLM_TIMEOUT_S")  # per request
    llm_retries: int = Field(3, alias="KERNELLOOP_LLM_RETRIES")  # on 429, 5xx, timeouts
    llm_backoff_s: float = Field(2.0, alias="KERNELLOOP_LLM_BACKOFF_S")  # first retry's wait; doubles
    llm_max_tokens: int = Field(4096, alias="KERNELLOOP_LLM_MAX_TOKENS")  # per completion
    llm_token_budget: int = Field(200_000, alias="KERNELLOOP_LLM_TOKEN_BUDGET")  # per campaign, prompt + completion
    llm_prices: str = Field("", alias="KERNELLOOP_LLM_PRICES")  # "model-a:2.5/10,...": USD per 1M prompt/completion tokens
    llm_cost_budget_usd: float | None = Field(None, alias="KERNELLOOP_LLM_COST_BUDGET_USD", gt=0)  # per campaign
    # Strategies the generator's bandit may choose from; one that cannot run (no endpoint, no template) is skipped.
    generator_strategies: str = Field("params,llm,crossover", alias="KERNELLOOP_STRATEGIES")

    # Observer service: a folder polled for dropped profiler traces (*.json, *.json.gz; off while
    # unset), how often it and the object-store inbox are polled, and the largest trace taken.
    trace_dir: Path | None = Field(None, alias="KERNELLOOP_TRACE_DIR")
    trace_poll_s: float = Field(2.0, gt=0, alias="KERNELLOOP_TRACE_POLL_S")
    trace_max_mb: float = Field(256.0, gt=0, alias="KERNELLOOP_TRACE_MAX_MB")

    @property
    def traces_dir(self) -> Path:
        return self.state_dir / "traces"

    @property
    def user_ops_dir(self) -> Path:
        """Ops added with `kernelloop op add` (shared/userops.py)."""
        return self.state_dir / "ops"


def nats_servers(nats_url: str) -> list[str]:
    """NATS_URL's servers: the NATS clients here take one URL or a list, not the comma-separated
    form other NATS tools accept."""
    return [url.strip() for url in nats_url.split(",") if url.strip()]
