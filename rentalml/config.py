"""One settings class for every part (contract: env prefix RENTALML_, nested delimiter __, .env file).

Nothing else in rentalml reads the environment directly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    partitions: int = 3


class FeastSettings(BaseModel):
    repo_path: Path = Path("feature_repo")


class ServeSettings(BaseModel):
    http_port: int = 8080
    grpc_port: int = 8081
    max_k: int = 1000
    default_k: int = 10
    request_timeout_s: float = 5.0
    cache_ttl_s: float = 300.0
    cache_size: int = 100_000


class AuthSettings(BaseModel):
    enabled: bool = False
    jwt_secret_file: Path | None = None
    jwt_public_key_file: Path | None = None
    jwt_secret: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["HS256", "RS256"])
    audience: str | None = None


class TrainSettings(BaseModel):
    seed: int = 42
    device: str = "cpu"


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
    feast: FeastSettings = Field(default_factory=FeastSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)

    @property
    def home_dir(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home.resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return (self.home_dir / "mlruns").as_uri()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'rentalml.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
