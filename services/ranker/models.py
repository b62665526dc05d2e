"""Models the ranker serves: loaded from the MLflow registry by alias, cached on disk by version,
checked before they serve, swapped atomically when an alias moves.

Nothing here runs on the request path except `ServedModel.score`: registry calls, downloads and
ONNX session creation happen in a background thread, and the request path only reads a dict of
immutable `ServedModel`s, which a reload replaces in one assignment.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from shared.config import ServingModelsConfig
from shared.features import ID_COLUMNS, TASTE_SPANS, USER_TOPIC_MEASURES, FeatureSpec
from shared.registry import Registry, RegistryError, VersionInfo

log = structlog.get_logger(__name__)


class ModelRejectedError(RuntimeError):
    """A version that cannot serve: wrong contract, wrong feature version, or insane scores.
    Refused for good; any other failure to load (a download, the registry) is retried."""


@dataclass(frozen=True)
class ServedModel:
    variant: str  # the alias it serves under: champion or challenger
    version: int
    feature_version: str
    contract: dict[str, Any]
    session: ort.InferenceSession
    position_column: int
    id_inputs: tuple[str, ...]  # the id columns this graph reads (an exporter drops unused inputs)

    def score(self, dense: np.ndarray, ids: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {"dense": dense, **{c: ids[c] for c in self.id_inputs}}
        (scores,) = self.session.run(None, feeds)
        return np.asarray(scores)


def load_session(path: Path, config: ServingModelsConfig) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.onnx_intra_threads
    options.inter_op_num_threads = config.onnx_inter_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def check_model(model: ServedModel, spec: FeatureSpec, rows: int) -> None:
    """Refuse a model the ranker cannot feed correctly, or one whose scores are not probabilities."""
    columns = model.contract["inputs"][0]["columns"]
    if model.feature_version != spec.version:
        raise ModelRejectedError(
            f"version {model.version} needs features {model.feature_version}, the store serves {spec.version}"
        )
    if tuple(columns) != spec.dense_names:
        raise ModelRejectedError(
            f"version {model.version} expects dense columns that differ from {spec.version}"
        )
    rng = np.random.default_rng(0)
    raw = {name: np.zeros(rows) for name in (*spec.user_fields, *spec.item_fields)}
    raw.update(
        age_ms=rng.uniform(0, 86_400_000, rows),
        position=np.zeros(rows),
        **{f"user_topic_{span}{m}": np.zeros(rows) for span in TASTE_SPANS for m in USER_TOPIC_MEASURES},
    )
    ids = {c: rng.integers(-1, 1000, rows).astype(np.int64) for c in ID_COLUMNS}
    scores = model.score(spec.dense_matrix(raw), ids)
    if scores.shape != (rows,) or not np.all(np.isfinite(scores)) or not np.all((scores > 0) & (scores < 1)):
        raise ModelRejectedError(f"version {model.version} failed the smoke score: {scores[:5]}")


class ModelManager:
    """Keeps one ServedModel per alias (champion, challenger) in step with the registry."""

    def __init__(
        self,
        registry: Callable[[], Registry],
        aliases: tuple[str, ...],
        cache_dir: Path,
        spec: FeatureSpec,
        config: ServingModelsConfig,
        on_change: Callable[[str, ServedModel | None, str], None] | None = None,
    ) -> None:
        self._registry_factory = registry
        self._registry: Registry | None = None
        self.aliases = aliases
        self.cache_dir = cache_dir
        self.spec = spec
        self.config = config
        self.models: dict[str, ServedModel] = {}
        self.refused: dict[int, str] = {}  # version -> why it failed its checks (never retried)
        self.failing: dict[int, tuple[int, float, str]] = {}  # version -> (failures, next try, error)
        self._on_change = on_change or (lambda alias, model, outcome: None)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.checked = threading.Event()
        """Set once the first look at the registry is over (whatever it found): until then a ranker
        without a model may still get one, afterwards it serves from the fallback."""

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    def model_dir(self, version: int) -> Path:
        """Cached download of a version; downloaded once, into a temporary name, then renamed."""
        target = self.cache_dir / str(version)
        if (target / "model.onnx").exists():
            return target
        staging = self.cache_dir / f".{version}.{time.time_ns()}"
        try:
            downloaded = self.registry.download(version, staging)
            shutil.rmtree(target, ignore_errors=True)
            downloaded.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def load(self, alias: str, info: VersionInfo) -> ServedModel:
        directory = self.model_dir(info.version)
        try:
            contract = Registry.contract(directory)
        except RegistryError as exc:
            raise ModelRejectedError(f"version {info.version}: {exc}") from exc
        try:
            session = load_session(directory / "model.onnx", self.config)
        except Exception:
            shutil.rmtree(directory, ignore_errors=True)  # the next attempt downloads it afresh
            raise
        model = ServedModel(
            variant=alias,
            version=info.version,
            feature_version=str(contract["feature_version"]),
            contract=contract,
            session=session,
            position_column=int(contract["position_column"]),
            id_inputs=tuple(i.name for i in session.get_inputs() if i.name in ID_COLUMNS),
        )
        check_model(model, self.spec, self.config.smoke_rows)
        return model

    def retry_after(self, failures: int) -> float:
        """Seconds before the next attempt after `failures` failed ones: exponential, capped."""
        initial, cap = self.config.retry_initial.total_seconds(), self.config.retry_max.total_seconds()
        return float(min(cap, initial * 2**failures))

    def refresh(self) -> dict[str, str]:
        """Bring every alias in step with the registry; returns what happened per alias."""
        outcomes: dict[str, str] = {}
        with self._lock:
            for alias in self.aliases:
                try:
                    info = self.registry.by_alias(alias)
                except Exception as exc:
                    outcomes[alias] = f"registry unavailable: {exc}"
                    continue
                current = self.models.get(alias)
                if info is None:
                    if current is not None:
                        self.models = {k: v for k, v in self.models.items() if k != alias}
                        self._on_change(alias, None, "removed")
                    outcomes[alias] = "none"
                    continue
                if current is not None and current.version == info.version:
                    outcomes[alias] = "unchanged"
                    continue
                if info.version in self.refused:
                    outcomes[alias] = f"refused: {self.refused[info.version]}"
                    continue
                failures, next_try, error = self.failing.get(info.version, (0, 0.0, ""))
                if time.monotonic() < next_try:
                    outcomes[alias] = f"retrying in {next_try - time.monotonic():.0f} s: {error}"
                    continue
                try:
                    model = self.load(alias, info)
                except ModelRejectedError as exc:
                    self.refused[info.version] = str(exc)
                    log.error("model_refused", alias=alias, version=info.version, error=str(exc))
                    self._on_change(alias, current, "refused")
                    outcomes[alias] = f"refused: {exc}"
                    continue
                except Exception as exc:  # a download or a registry read that may work next time
                    wait = self.retry_after(failures)
                    self.failing[info.version] = (failures + 1, time.monotonic() + wait, repr(exc))
                    log.warning("model_load_failed", alias=alias, version=info.version, error=repr(exc),
                                failures=failures + 1, retry_in_s=round(wait, 1))  # fmt: skip
                    self._on_change(alias, current, "failed")
                    outcomes[alias] = f"failed, retrying in {wait:.0f} s: {exc!r}"
                    continue
                self.failing.pop(info.version, None)
                self.models = {**self.models, alias: model}  # one assignment: requests see old or new
                log.info(
                    "model_loaded",
                    alias=alias,
                    version=info.version,
                    previous=current.version if current else None,
                )
                self._on_change(alias, model, "loaded")
                outcomes[alias] = f"loaded version {info.version}"
        return outcomes

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception as exc:
                    log.error("model_refresh_failed", error=str(exc))
                self.checked.set()
                self._stop.wait(self.config.reload_interval.total_seconds())

        self._thread = threading.Thread(target=loop, name="model-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
