"""The MLflow model registry as feedrank uses it: one registered model, versions tagged with their
feature version and headline metrics, and aliases that say who serves (champion) and who is being
tested (challenger). Champion moves are recorded, so a rollback is one step back.

Imported by the trainer (writes), the ranker (reads, downloads) and the monitor (promotes); it needs
only the MLflow client, never torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from shared.config import RegistryConfig
from shared.modeltags import HISTORY_TAG, PROMOTED_AT_TAG


class RegistryError(RuntimeError):
    """A registry operation cannot be done as asked (unknown version, nothing to roll back to)."""


class RegistryUnavailableError(RegistryError):
    """The registry did not answer (unreachable, 5xx, timeout): nothing can be concluded from it.

    Never read as "no such alias": that would promote straight to champion, erase the rollback
    history or unload a serving model because of a network blip."""


_ABSENT_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def is_absent(exc: MlflowException) -> bool:
    """The registry answered, and the thing asked for does not exist (not an outage)."""
    return exc.error_code in _ABSENT_CODES and "not found" in str(exc).lower()


def _unavailable(exc: Exception, what: str) -> RegistryUnavailableError:
    return RegistryUnavailableError(f"model registry unavailable while {what}: {exc}")


@dataclass(frozen=True)
class VersionInfo:
    version: int
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str | None
    created_ms: int
    source: str

    def metric(self, name: str) -> float | None:
        value = self.tags.get(name)
        return float(value) if value not in (None, "") else None


def configure_tracking(tracking_uri: str) -> None:
    """Point the MLflow client at the store; a local sqlite store gets its directory created."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)


def default_artifact_root(tracking_uri: str, configured: str | None) -> str | None:
    """Where a new experiment keeps artifacts: as configured, else beside a local sqlite store, else
    wherever the tracking server keeps them (None)."""
    if configured:
        return configured
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).parent.resolve() / "artifacts")
    return None


class Registry:
    def __init__(self, tracking_uri: str, config: RegistryConfig) -> None:
        configure_tracking(tracking_uri)
        self.tracking_uri = tracking_uri
        self.config = config
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @property
    def name(self) -> str:
        return self.config.model_name

    def _info(self, mv: Any) -> VersionInfo:
        return VersionInfo(
            version=int(mv.version),
            aliases=tuple(sorted(getattr(mv, "aliases", []) or [])),
            tags=dict(mv.tags or {}),
            run_id=mv.run_id,
            created_ms=int(mv.creation_timestamp or 0),
            source=str(mv.source),
        )

    def versions(self) -> list[VersionInfo]:
        """Every version, newest first (none while the model is not registered yet)."""
        try:
            found = self.client.search_model_versions(f"name='{self.name}'")
            infos = [self._info(self.client.get_model_version(self.name, mv.version)) for mv in found]
        except MlflowException as exc:
            if is_absent(exc):
                return []
            raise _unavailable(exc, "listing versions") from exc
        except OSError as exc:
            raise _unavailable(exc, "listing versions") from exc
        return sorted(infos, key=lambda v: v.version, reverse=True)

    def get(self, version: int) -> VersionInfo:
        try:
            return self._info(self.client.get_model_version(self.name, str(version)))
        except MlflowException as exc:
            if is_absent(exc):
                raise RegistryError(f"{self.name} has no version {version}") from exc
            raise _unavailable(exc, f"reading version {version}") from exc
        except OSError as exc:
            raise _unavailable(exc, f"reading version {version}") from exc

    def by_alias(self, alias: str) -> VersionInfo | None:
        """The version behind `alias`; None only when the registry says there is none."""
        try:
            return self._info(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException as exc:
            if is_absent(exc):
                return None
            raise _unavailable(exc, f"reading alias {alias!r}") from exc
        except OSError as exc:
            raise _unavailable(exc, f"reading alias {alias!r}") from exc

    def set_alias(self, alias: str, version: int) -> None:
        self.get(version)  # fail clearly on an unknown version
        try:
            self.client.set_registered_model_alias(self.name, alias, str(version))
        except (MlflowException, OSError) as exc:
            raise _unavailable(exc, f"setting alias {alias!r}") from exc

    def remove_alias(self, alias: str) -> None:
        try:
            self.client.delete_registered_model_alias(self.name, alias)
        except MlflowException as exc:
            if is_absent(exc):
                return
            raise _unavailable(exc, f"removing alias {alias!r}") from exc
        except OSError as exc:
            raise _unavailable(exc, f"removing alias {alias!r}") from exc

    def set_version_tag(self, version: int, key: str, value: str) -> None:
        try:
            self.client.set_model_version_tag(self.name, str(version), key, value)
        except (MlflowException, OSError) as exc:
            raise _unavailable(exc, f"tagging version {version}") from exc

    # ------------------------------------------------------------------ champion moves

    def history(self) -> list[int]:
        """Versions that were champion, oldest first; empty only if the model is not registered."""
        try:
            tags = self.client.get_registered_model(self.name).tags or {}
        except MlflowException as exc:
            if is_absent(exc):
                return []
            raise _unavailable(exc, "reading the champion history") from exc
        except OSError as exc:
            raise _unavailable(exc, "reading the champion history") from exc
        return [int(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]

    def _write_history(self, history: list[int]) -> None:
        try:
            self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history))
        except (MlflowException, OSError) as exc:
            raise _unavailable(exc, "writing the champion history") from exc

    def promote(self, version: int) -> VersionInfo | None:
        """Make `version` the champion; returns the previous champion (kept for rollback)."""
        previous = self.by_alias(self.config.champion_alias)
        self.set_alias(self.config.champion_alias, version)
        challenger = self.by_alias(self.config.challenger_alias)
        if challenger is not None and challenger.version == version:
            self.remove_alias(self.config.challenger_alias)
        history = [v for v in self.history() if v != version] + [version]
        self._write_history(history)
        self.set_version_tag(version, PROMOTED_AT_TAG, str(int(time.time())))
        return previous

    def rollback(self) -> tuple[int, int]:
        """Champion goes back to the version that was champion before it. Returns (from, to)."""
        current = self.by_alias(self.config.champion_alias)
        if current is None:
            raise RegistryError("there is no champion to roll back")
        history = [v for v in self.history() if v != current.version]
        if not history:
            raise RegistryError(f"version {current.version} has no predecessor to roll back to")
        target = history[-1]
        self.set_alias(self.config.champion_alias, target)
        self._write_history(history)
        return current.version, target

    # ------------------------------------------------------------------ artifacts

    @staticmethod
    def contract(model_dir: Path) -> dict[str, Any]:
        """The input contract stored in the model's MLmodel metadata by the trainer."""
        document = yaml.safe_load((model_dir / "MLmodel").read_text())
        contract: dict[str, Any] = (document.get("metadata") or {}).get("contract") or {}
        if not contract:
            raise RegistryError(f"{model_dir} has no input contract in its MLmodel metadata")
        return contract

    def download(self, version: int, destination: Path) -> Path:
        """The version's model directory (model.onnx, contract.json, MLmodel) under `destination`."""
        destination.mkdir(parents=True, exist_ok=True)
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{self.name}/{version}",
            dst_path=str(destination),
            tracking_uri=self.tracking_uri,
        )
        return Path(path)
