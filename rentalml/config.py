"""One settings class for every part (contract: env prefix RENTALML_, nested delimiter __, .env file).

Nothing else in rentalml reads the environment directly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    partitions: int = 3
    replication_factor: int = 1
    # TLS (security_protocol SSL or SASL_SSL): CA bundle and optional client certificate (mTLS, e.g. Strimzi)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    #: idempotent producers (kafka-python's default; right for Kafka/Strimzi). Tansu 0.6 stores an idempotent
    #: producer's sequence before the batch itself, so a batch in flight when it stops is acknowledged as a
    #: duplicate when resent and lost (tests/test_faults.py broker restart): false there, which makes the
    #: processor's outputs at-least-once across a broker restart (state stays exactly-once: it dedupes by event id)
    idempotence: bool = True


class StreamSettings(BaseModel):
    """`rentalml stream run` (docs/architecture.md "Streaming")."""

    group_id: str = "rentalml-stream"
    #: most records one poll hands to a batch (max_poll_records); batches are this large only while catching up
    #: (backlog): per-entity costs (features, pushes, cache drops) are paid once per batch, not once per event
    batch_size: int = 10000
    poll_timeout_ms: int = 100
    #: how long the broker may hold a fetch waiting for data (kafka-python default 500 ms adds to freshness)
    fetch_max_wait_ms: int = 50
    #: events older than (max event time seen - allowed_lateness_s) go to dead_letter as "late event"
    allowed_lateness_s: int = 3600
    #: event ids are remembered this long beyond the lateness bound (event time) to recognise redeliveries
    dedupe_margin_s: int = 3600
    #: recent distinct properties kept per user (`rentalml.state.recent_history`)
    history_len: int = 50
    #: recent interactions kept per user for the user_taste features (30-day window, as the batch table)
    taste_events: int = 200
    #: also append the pushed rows to the Feast offline store (parquet); off: the batch tables are rebuilt
    push_offline: bool = False
    #: Redis key prefix of the stream state store
    key_prefix: str = "rentalml:stream"


class FeastSettings(BaseModel):
    repo_path: Path = Path("feature_repo")
    project: str = "rentalml"
    #: SQLAlchemy URL of a SQL registry (cluster: PostgreSQL); unset: file registry $RENTALML_HOME/feast/registry.db
    registry_url: str | None = None
    #: "sqlite" | "redis"; unset: redis when redis_url is set, else SQLite at $RENTALML_HOME/feast/online.db
    online_store: str | None = None
    #: the online store's own Redis (redis://host:port/db), when it is not redis_url (the cache's and the stream's)
    redis_url: str | None = None
    #: socket timeout of the online store's Redis connections (0 = none): a stalled server fails a read, never hangs
    redis_socket_timeout_s: float = 5.0
    #: the pipeline's features step takes the property attributes from Feast (point in time) and records the views
    training: bool = False


class ServeSettings(BaseModel):
    http_port: int = 8080
    grpc_port: int = 8081
    max_k: int = 1000
    default_k: int = 10
    request_timeout_s: float = 5.0
    cache_ttl_s: float = 300.0
    cache_size: int = 100_000
    # hot reload: before the new version serves, its cache rows for up to this many of the most asked (user, k)
    # (asked twice or more) are computed and cached, so the hot users hit at once (0 = off)
    prewarm_rows: int = 1000
    # A/B canary inside one `rentalml serve` (registry aliases champion/challenger); 0 = no canary
    challenger_percent: float = 0.0
    # pinned arms (the KServe deploy step sets them on the transformer): registry versions served as champion /
    # challenger instead of the aliases' current versions; "" = follow the alias
    champion_version: str = ""
    challenger_version: str = ""
    ab_salt: str = "rentalml-ab-1"
    # "file" ($RENTALML_HOME/ab/outcomes.jsonl or outcomes_path) | "kafka" (the ab_outcomes topic) | "off"
    outcomes_sink: Literal["file", "kafka", "off"] = "file"
    outcomes_path: Path | None = None
    # "canary" (while a challenger is served) | "always" | "off"
    log_impressions: Literal["canary", "always", "off"] = "canary"
    ab_min_impressions: int = 1000
    ab_alpha: float = 0.05
    # hot reload: poll the registry aliases every N seconds (0 = only POST /admin/reload)
    reload_poll_s: float = 0.0
    # registry outage (rentalml.registry.cache): verified bundles fetched from MLflow are kept here (default
    # $RENTALML_HOME/bundles) and `rentalml serve` starts from the alias's last one when MLflow is unreachable;
    # each MLflow call of the server gives up after this timeout and retries (MLFLOW_HTTP_REQUEST_* win if set)
    registry_cache_dir: Path | None = None
    registry_timeout_s: float = 5.0
    registry_retries: int = 1
    # cluster mode of `rentalml ab promote|rollback`: JSON-patch the InferenceService's transformer arms (env)
    cluster: bool = False
    isvc_name: str = "rental-recommender"
    namespace: str | None = None
    # where candidate features come from: "bundle" (the bundle's property table) | "feast" (the online store)
    feature_source: Literal["bundle", "feast"] = "bundle"
    # deadline of one request's online feature fetch (feature_source=feast); past it, or on an error, the request is
    # answered with the bundle's own features and ml_feature_fallback_total{reason=timeout|error} counts it
    feature_timeout_s: float = 0.05
    # transformer role: the v2 predictor (Triton in the cluster) that runs rental-retrieval / rental-ranker
    predictor_url: str | None = None
    # fold-in from the stream state: users' streamed interactions and never-seen listings, without retraining
    fold_in: bool = False
    live_refresh_s: float = 1.0
    # v2 REST infer answered in front of KServe's FastAPI stack (rentalml.inference.protocol.rest); same wire format
    fast_path: bool = True
    # which scorer graph answers: "fp32" (scorer.onnx) | "int8" (scorer.int8.onnx, dynamic quantization; check its
    # accuracy first: `rentalml optimize` marks it deployable or not, docs/benchmarks.md)
    precision: Literal["fp32", "int8"] = "fp32"
    # glibc malloc at start-up (rentalml.inference.heap.tune_malloc; 0 = glibc's default): blocks of this many bytes
    # or more in mappings of their own, so what a reload frees goes back to the OS; at most this many arenas (off:
    # no better than the threshold alone in the soak, docs/benchmarks.md "Soak")
    malloc_arena_max: int = Field(0, ge=0)
    malloc_mmap_threshold: int = Field(128 * 1024, ge=0, le=32 * 1024 * 1024)


class AuthSettings(BaseModel):
    """JWT bearer auth of the serving API (rentalml.inference.auth; docs/operations.md "Auth")."""

    enabled: bool = False
    # one key source: an HMAC secret, an RSA public key (PEM), or a JWK Set (several keys, each with a kid)
    jwt_secret_file: Path | None = None
    jwt_public_key_file: Path | None = None
    jwt_secret: str | None = None
    jwks_file: Path | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["HS256", "RS256"])
    # checked when set (the token must then carry aud / iss)
    audience: str | None = None
    issuer: str | None = None
    require: list[str] = Field(default_factory=lambda: ["exp"])  # claims a token must carry
    leeway_s: float = 30.0  # clock skew allowed on exp / nbf / iat
    max_token_bytes: int = 8192  # longer Authorization values are refused before parsing
    # /admin/* (and gRPC model repository load/unload) need this role in this claim (dotted path allowed)
    admin_role: str = "rentalml-admin"
    roles_claim: str = "roles"


class MonitorSettings(BaseModel):
    """Drift monitoring (rentalml monitor drift): thresholds and what an over-threshold result triggers."""

    psi_threshold: float = 0.25
    ks_threshold: float = 0.2
    ks_alpha: float = 0.01
    min_samples: int = 50
    window_days: float | None = 7.0
    retrain: Literal["local", "kfp", "off"] = "local"  # local (kfp.local pipeline run) | kfp (submit to KFP_HOST) | off
    retrain_source: str | None = None  # the pipeline's data source for the retraining run (default: --current)
    pushgateway_url: str | None = None


class ExportSettings(BaseModel):
    n_candidates: int = 200  # retrieval.onnx: candidates handed to ranker.onnx
    ann_min_items: int = 100_000  # catalogues this large retrieve through an ANN index instead of brute force
    # the ANN index (rentalml.runtime.retrieval; benchmarks/retrieval.py): faiss IVF-Flat, inner product, at its
    # default setting unless ann_params sets it (e.g. {"nprobe": 128} or, for faiss_hnsw, {"ef_search": 400})
    ann_backend: Literal["faiss_ivf", "faiss_hnsw", "brute"] = "faiss_ivf"
    ann_params: dict = {}
    triton_k: int = 100  # rental-scorer in the Triton repository: k baked into the graph
    triton_gpu: bool = False  # Triton configs: KIND_GPU + ONNX Runtime's TensorRT accelerator (prod overlay)


class TrainSettings(BaseModel):
    seed: int = 42
    #: `rentalml train --device` default: cpu | cuda (bf16 autocast; an error at startup without CUDA) | auto (cuda
    #: when available). NeuralParams.device; the model comes back to the CPU in float32 either way
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    #: DuckDB's memory limit in the data steps (validation over the parquet files); past it DuckDB spills to disk
    data_memory: str = "2GB"
    #: test users scored by the evaluation of `rentalml train` and the pipeline's evaluate step (a seeded random
    #: sample; 0: all). 100k users put nDCG@10's standard error near 3e-4 while the evaluation of 1M users × 100k
    #: properties stays minutes, not an hour; datasets with fewer test users are evaluated whole
    eval_users: int = 100_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RENTALML_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    home: Path = Path(".rentalml")
    mlflow_tracking_uri: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    model_name: str = "rental-recommender"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    feast: FeastSettings = Field(default_factory=FeastSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)

    @property
    def home_dir(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home.resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def bundle_cache_dir(self) -> Path:
        """Bundles fetched from the registry, one verified directory per <model name>/<version>."""
        return Path(self.serve.registry_cache_dir) if self.serve.registry_cache_dir else self.home_dir / "bundles"

    @property
    def artifact_root(self) -> str:
        return (self.home_dir / "mlruns").as_uri()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'rentalml.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
