"""The training loop: mini-batch AdamW on the click log loss, early stopping on validation loss."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from services.trainer.data import Split
from services.trainer.model import ModelSpec, build_model, build_vocabulary
from shared.config import ModelConfig
from shared.evaluation import auc, log_loss
from shared.features import ID_COLUMNS

log = structlog.get_logger(__name__)

EpochCallback = Callable[[dict[str, float]], None]


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)  # libraries below us may use the legacy global state
    return torch.Generator().manual_seed(seed)


def make_spec(config: ModelConfig, dense_names: tuple[str, ...], train: Split) -> ModelSpec:
    """Vocabularies and standardisation come from the training split only."""
    return ModelSpec(
        architecture=config.architecture,
        dense_names=dense_names,
        vocabularies={
            c: build_vocabulary(train.ids[c], config.embedding.min_count) for c in config.embedding.columns
        },
        dense_mean=train.dense.mean(axis=0),
        dense_std=train.dense.std(axis=0),
        config=config,
    )


@dataclass
class TrainResult:
    model: nn.Module
    spec: ModelSpec
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    device: str = "cpu"


def tensors(split: Split, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    return (
        torch.from_numpy(split.dense).to(device),
        {c: torch.from_numpy(split.ids[c]).to(device) for c in ID_COLUMNS},
        torch.from_numpy(split.labels).to(device),
    )


@torch.no_grad()
def predict(
    model: nn.Module, dense: np.ndarray, ids: dict[str, np.ndarray], batch: int = 65536
) -> np.ndarray:
    """Click probabilities, in batches, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for lo in range(0, dense.shape[0], batch):
        logits = model(
            torch.from_numpy(np.ascontiguousarray(dense[lo : lo + batch])).to(device),
            *(torch.from_numpy(ids[c][lo : lo + batch]).to(device) for c in ID_COLUMNS),
        )
        out.append(torch.sigmoid(logits).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def recency_weights(ts: np.ndarray, half_life_ms: int | None) -> np.ndarray:
    """Per-row loss weights halving every `half_life_ms` back from the newest row, mean 1.

    A retrain after drift learns mostly from the world as it is now, while older rows still
    keep the ids' embeddings trained. None: every row counts the same."""
    if half_life_ms is None or ts.size == 0:
        return np.ones(ts.size, dtype=np.float32)
    age = (ts.max() - ts).astype(np.float64)
    weights = np.exp2(-age / half_life_ms)
    return np.asarray(weights / weights.mean(), dtype=np.float32)


def train_model(
    config: ModelConfig,
    dense_names: tuple[str, ...],
    train: Split,
    validation: Split,
    on_epoch: EpochCallback | None = None,
    recency_half_life_ms: int | None = None,
) -> TrainResult:
    cfg = config.training
    torch.set_num_threads(cfg.threads)
    generator = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    spec = make_spec(config, dense_names, train)
    model = build_model(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    dense, ids, labels = tensors(train, device)
    weights = torch.from_numpy(recency_weights(train.ts, recency_half_life_ms)).to(device)
    n = len(train)
    result = TrainResult(model=model, spec=spec, device=str(device))
    best_loss, best_state, stale = float("inf"), copy.deepcopy(model.state_dict()), 0
    started = time.perf_counter()
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        epoch_started = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(device)
        total, batches = 0.0, 0
        for lo in range(0, n, cfg.batch_size):
            rows = order[lo : lo + cfg.batch_size]
            batch_ids = {c: ids[c][rows] for c in ID_COLUMNS}
            if config.embedding.id_dropout > 0:
                hidden = (
                    torch.rand(rows.numel(), generator=generator).to(device) < config.embedding.id_dropout
                )
                for c in ("user_id", "item_id"):
                    batch_ids[c] = torch.where(hidden, torch.full_like(batch_ids[c], -1), batch_ids[c])
            logits = model(dense[rows], *(batch_ids[c] for c in ID_COLUMNS))
            loss = (loss_fn(logits, labels[rows]) * weights[rows]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        val_p = predict(model, validation.dense, validation.ids)
        metrics = {
            "epoch": float(epoch),
            "train_loss": total / max(batches, 1),
            "val_log_loss": log_loss(validation.labels, val_p),
            "val_auc": auc(validation.labels, val_p),
            "epoch_seconds": time.perf_counter() - epoch_started,
        }
        result.history.append(metrics)
        log.info("epoch", **{k: round(v, 5) for k, v in metrics.items()})
        if on_epoch is not None:
            on_epoch(metrics)
        if metrics["val_log_loss"] < best_loss - cfg.min_delta:
            best_loss, best_state, stale = metrics["val_log_loss"], copy.deepcopy(model.state_dict()), 0
            result.best_epoch = epoch
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("early_stopping", epoch=epoch, best_epoch=result.best_epoch)
                break
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result


def save_checkpoint(result: TrainResult, path: Any) -> None:
    torch.save({"spec": result.spec.to_dict(), "state_dict": result.model.state_dict()}, path)


def load_checkpoint(path: Any) -> tuple[nn.Module, ModelSpec]:
    payload = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    spec = ModelSpec.from_dict(payload["spec"])
    model = build_model(spec)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, spec
