"""Typed, validated configuration of the server. Parsed from the CLI only in `serving.cli`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class RuntimeConfig:
    """How ONNX Runtime runs the graphs."""

    device: str = "auto"  # auto: CUDA when really active, else CPU; cuda: fail unless CUDA runs
    intra_op_threads: int = 1  # threads inside one ORT call; inter-op is always 1
    cuda_device_id: int = 0
    # Keep state as OrtValues between steps (serving.cuda_state): "auto" on CUDA only; "on" also on
    # CPU, which runs the GPU code path without a GPU (tests); "off" never.
    resident_state: str = "auto"

    def __post_init__(self) -> None:
        _require(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _require(
            self.resident_state in ("auto", "on", "off"),
            f"resident_state must be auto, on or off, got {self.resident_state!r}",
        )
        _require(self.intra_op_threads >= 0, "intra_op_threads must be >= 0 (0 lets ORT choose)")
        _require(self.cuda_device_id >= 0, "cuda_device_id must be >= 0")


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching of stream steps across all streams of one model version."""

    max_batch_size: int = 1024  # rows per ORT call; larger requests are split
    max_batch_delay_us: int = 0  # extra wait for more rows when the runner is idle (0: none)

    def __post_init__(self) -> None:
        _require(self.max_batch_size >= 1, "max_batch_size must be >= 1")
        _require(self.max_batch_delay_us >= 0, "max_batch_delay_us must be >= 0 (microseconds)")

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_us / 1e6


@dataclass(frozen=True)
class StateConfig:
    """Per-series recurrent state: how many series may live and for how long."""

    max_series: int = 1_000_000  # live series across all streams; new ones past it are refused
    idle_timeout_s: float = 3600.0  # a series not stepped for this long is freed
    initial_capacity: int = 1024  # state rows preallocated per model version; doubles up to max_series

    def __post_init__(self) -> None:
        _require(self.max_series >= 1, "max_series must be >= 1")
        _require(self.idle_timeout_s > 0, "idle_timeout_s must be > 0 seconds")
        _require(self.initial_capacity >= 1, "initial_capacity must be >= 1")

    @property
    def sweep_interval_s(self) -> float:
        """How often idle series are looked for: often enough to honour the timeout within ~25%."""
        return min(1.0, self.idle_timeout_s / 4)


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what one client can ask for; past them a request gets a status naming the flag.

    Defaults leave room for the largest real workloads (a stream of 100,000 series; a request of
    100,000 observations with 12-character ids is 2.7 MiB, under the 4 MiB message limit) while
    stopping one client from taking the whole server: the live-series cap
    (StateConfig.max_series) is shared by all.
    """

    # Series ids are kept (as dict keys, in the response encoder's cache) for as long as their
    # series live; 256 bytes fits any natural key (UUIDs, paths, tag sets) with room to spare.
    max_series_id_bytes: int = 256
    max_series_per_stream: int = 100_000  # live series one StreamForecast call may hold
    max_streams: int = 10_000  # concurrent StreamForecast calls
    max_observations_per_request: int = 100_000  # per StreamRequest; for Forecast, summed over histories

    def __post_init__(self) -> None:
        _require(self.max_series_id_bytes >= 1, "max_series_id_bytes must be >= 1")
        _require(self.max_series_per_stream >= 1, "max_series_per_stream must be >= 1")
        _require(self.max_streams >= 1, "max_streams must be >= 1")
        _require(self.max_observations_per_request >= 1, "max_observations_per_request must be >= 1")


@dataclass(frozen=True)
class SecurityConfig:
    """TLS from PEM files and bearer tokens; the files are read at start-up (serving.security)."""

    tls_cert: Path | None = None  # server certificate chain (PEM); with tls_key: serve TLS
    tls_key: Path | None = None  # its private key (PEM)
    tls_client_ca: Path | None = None  # CA bundle (PEM) client certificates must chain to: mutual TLS
    auth_token_file: Path | None = None  # one token a line: every RPC but health needs one of them
    # Signs resumable-series snapshots (CONTRACT §8): a file (--state-secret-file) or the value of
    # FORECAST_STATE_SECRET, never both; neither: return_state/resume_state are refused.
    state_secret_file: Path | None = None
    state_secret: bytes | None = field(default=None, repr=False)  # never logged

    def __post_init__(self) -> None:
        _require(
            (self.tls_cert is None) == (self.tls_key is None),
            "tls_cert and tls_key go together: give both --tls-cert and --tls-key, or neither",
        )
        _require(
            self.tls_client_ca is None or self.tls_cert is not None,
            "tls_client_ca (--tls-client-ca) needs TLS: give --tls-cert and --tls-key as well",
        )
        _require(
            self.state_secret_file is None or self.state_secret is None,
            "give the state secret once: --state-secret-file or FORECAST_STATE_SECRET, not both",
        )

    @property
    def mode(self) -> str:
        """plaintext, tls or mtls."""
        if self.tls_cert is None:
            return "plaintext"
        return "mtls" if self.tls_client_ca is not None else "tls"


@dataclass(frozen=True)
class ModelSourceConfig:
    """Where the model comes from and how often its registry alias is checked."""

    model_uri: str = "models:/forecaster@production"  # or a local directory
    watch_interval_s: float = 30.0  # 0 disables watching the alias
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    model_name: str | None = None  # name reported for a local directory (default "forecaster")

    def __post_init__(self) -> None:
        _require(bool(self.model_uri), "model_uri must not be empty")
        _require(self.watch_interval_s >= 0, "watch_interval_s must be >= 0 seconds (0 disables)")


@dataclass(frozen=True)
class MonitorConfig:
    """Live accuracy (serving.live): which series are scored, the recent window, the shadow."""

    fraction: float = 1.0  # share of series ids monitored (a deterministic hash of the id)
    max_series: int = 100_000  # monitored series at most per model version
    # Score the forecasts of every K-th origin only (those whose step, timestamp // freq_ms, is a
    # multiple of K): 1/K of the memory per series and of the pairs to score. None: the smallest K
    # whose scorer, with max_series series, fits memory_mib (serving.live.origin_stride_for).
    # Default model: 28,864 bytes per series at K = 1, 4,336 at K = 8, which the defaults choose
    # (413 MiB; the whole server with 100,000 live series measured 875 MiB: docs/benchmarks.md).
    origin_stride: int | None = None
    # 448: with the state of 100,000 live series (~460 MiB) the server stays under 1 GiB.
    memory_mib: int = 448  # per version's scorer, for choosing origin_stride
    window_observations: int = 100_000  # observations the "recent" figures span, per version
    shadow_alias: str | None = None  # registry alias stepped beside the served version, never answered

    def __post_init__(self) -> None:
        _require(0.0 <= self.fraction <= 1.0, f"monitor fraction must be in [0, 1], got {self.fraction}")
        _require(self.max_series >= 0, "monitor max_series must be >= 0 (0 disables live accuracy)")
        _require(self.window_observations >= 8, "monitor window_observations must be >= 8")
        _require(
            self.origin_stride is None or self.origin_stride >= 1,
            f"monitor origin_stride must be >= 1, got {self.origin_stride}",
        )
        _require(self.memory_mib >= 1, "monitor memory_mib must be >= 1")
        _require(self.shadow_alias is None or bool(self.shadow_alias), "shadow_alias must not be empty")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 and self.max_series > 0


@dataclass(frozen=True)
class ServerConfig:
    """The whole server: transport, operations and the data plane's parts."""

    host: str = "127.0.0.1"  # loopback only unless asked: nothing is exposed by default
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = 9100  # 0 picks a free port; None disables the metrics endpoint
    # The metrics endpoint is plain HTTP without tokens (Prometheus scrapes it), so it may need
    # another interface than gRPC: e.g. gRPC on 0.0.0.0 behind TLS, metrics on an internal address.
    metrics_host: str | None = None  # None: the same as host
    # The Open Inference Protocol's HTTP/REST binding, on host: 0 picks a free port, None: off.
    http_port: int | None = None
    max_receive_message_bytes: int = 4 * 1024 * 1024  # larger messages get RESOURCE_EXHAUSTED
    grace_s: float = 10.0  # how long in-flight RPCs may finish after SIGTERM
    source: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    state: StateConfig = field(default_factory=StateConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        _require(
            self.monitor.shadow_alias is None or self.source.model_uri.startswith("models:/"),
            "--shadow-alias needs a registry model URI (models:/NAME@ALIAS): a local directory has no aliases",
        )
        _require(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")
        _require(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            f"metrics_port must be in 0..65535, got {self.metrics_port}",
        )
        _require(
            self.http_port is None or 0 <= self.http_port <= 65535,
            f"http_port must be in 0..65535, got {self.http_port}",
        )
        _require(self.max_receive_message_bytes >= 1024, "max_receive_message_bytes must be >= 1024")
        _require(self.grace_s >= 0, "grace_s must be >= 0 seconds")
        _require(bool(self.host), "host must not be empty")
        _require(self.metrics_host is None or bool(self.metrics_host), "metrics_host must not be empty")

    @property
    def metrics_bind_host(self) -> str:
        return self.host if self.metrics_host is None else self.metrics_host
