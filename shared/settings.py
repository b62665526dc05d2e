"""Infrastructure settings from the environment (and `.env`), one class for every service.

Behaviour knobs live in `config/*.yaml` (see shared.config); this class holds only where things
are: Redis instances, the lake, the config directory and the selected profile. Values without a
default are required: a service refuses to start rather than guess where its data lives.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import Field, RedisDsn
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.config import (
    DataConfig,
    ModelConfig,
    MonitoringConfig,
    ServingConfig,
    load_data_config,
    load_model_config,
    load_monitoring_config,
    load_serving_config,
)

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEEDRANK_", env_file=".env", extra="ignore")

    feature_store_url: RedisDsn = Field(description="Redis holding online features and real-time signals")
    queue_url: RedisDsn = Field(description="Redis holding RQ queues, pipeline runs and locks")
    lake_path: Path = Field(description="root of the Parquet lake (events, quarantine, features)")
    profile: str = Field(default="default", description="config profile: default, tiny, bench, ...")
    config_dir: Path = REPO_CONFIG_DIR
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mlflow_tracking_uri: str = Field(
        default="sqlite:///data/mlflow/mlflow.db",
        description="MLflow tracking store: a local sqlite file by default, http://mlflow:5000 in Compose",
    )
    mlflow_artifact_root: str | None = Field(
        default=None,
        description="artifact location for a new experiment; None lets the server decide (its proxied store)",
    )
    git_sha: str | None = Field(default=None, description="code version when .git is absent (images)")
    admin_token: str | None = Field(default=None, description="bearer token of the ranker's /admin endpoints")
    model_cache_dir: Path = Field(default=Path("data/model-cache"), description="ranker's local model cache")
    ranker_url: str = Field(
        default="http://127.0.0.1:8000", description="where the traffic simulator sends /rank"
    )
    ingest_url: str = Field(default="http://127.0.0.1:8001", description="where engagements are posted")
    alert_webhook_url: str | None = Field(default=None, description="alerts are also POSTed here when set")

    def data_config(self) -> DataConfig:
        return load_data_config(self.config_dir, self.profile)

    def ranking_model_config(self) -> ModelConfig:
        return load_model_config(self.config_dir, self.profile)

    def serving_config(self) -> ServingConfig:
        return load_serving_config(self.config_dir, self.profile)

    def monitoring_config(self) -> MonitoringConfig:
        return load_monitoring_config(self.config_dir, self.profile)


@cache
def get_settings() -> Settings:
    return Settings()  # required values come from the environment
