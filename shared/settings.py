"""The one Settings class. Read once, in a service's __main__; pure functions take plain arguments."""
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    nats_url: str = Field("nats://127.0.0.1:4222", alias="NATS_URL")
    otel_exporter_otlp_endpoint: str | None = Field(None, alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    state_dir: Path = Field(Path(".kernelloop"), alias="KERNELLOOP_STATE_DIR")

    # Observer SDK: a window is published every window_s; one call in sample_every is timed.
    window_s: float = Field(5.0, alias="KERNELLOOP_WINDOW_S")
    sample_every: int = Field(8, alias="KERNELLOOP_SAMPLE_EVERY")

    # Detector: a bucket must hold this share of its op's time to be worth a campaign.
    min_time_share: float = Field(0.10, alias="KERNELLOOP_MIN_TIME_SHARE")
    confirm_windows: int = Field(2, alias="KERNELLOOP_CONFIRM_WINDOWS")
    cooldown_s: float = Field(600.0, alias="KERNELLOOP_COOLDOWN_S")

    # Campaign budget handed to the generator.
    rounds: int = Field(3, alias="KERNELLOOP_ROUNDS")
    variants_per_round: int = Field(8, alias="KERNELLOOP_VARIANTS_PER_ROUND")

    # Benchmarker.
    bench_timeout_s: float = Field(300.0, alias="KERNELLOOP_BENCH_TIMEOUT_S")
    bench_reps: int = Field(20, alias="KERNELLOOP_BENCH_REPS")

    # Deployer: a candidate must beat the incumbent by this margin at the CI's lower bound.
    min_speedup_margin: float = Field(0.02, alias="KERNELLOOP_MIN_SPEEDUP_MARGIN")
    require_approval: bool = Field(False, alias="KERNELLOOP_REQUIRE_APPROVAL")

    @property
    def traces_dir(self) -> Path:
        return self.state_dir / "traces"
