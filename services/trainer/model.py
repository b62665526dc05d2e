"""Ranking models. Both take the same inputs, the ranker's ONNX contract:

    dense      float32 [batch, n_dense]   FeatureSpec.dense_names order (position included)
    user_id    int64   [batch]            raw ids; ids never seen in training map to a learned
    item_id    int64   [batch]            "unknown" row inside the model, so serving never
    creator_id int64   [batch]            needs a vocabulary of its own
    topic_id   int64   [batch]

and return a click logit per row. The vocabulary (raw id -> embedding row) and the dense
standardisation are buffers of the model, so they travel inside the exported ONNX graph.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.config import ModelConfig
from shared.features import ID_COLUMNS

UNKNOWN = 0
"""Embedding row shared by every id not in the vocabulary."""


def build_vocabulary(ids: np.ndarray, min_count: int) -> np.ndarray:
    """Dense lookup table raw id -> row (0 = unknown) for ids seen at least `min_count` times."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[ids >= 0]
    if ids.size == 0:
        return np.zeros(1, dtype=np.int64)
    values, counts = np.unique(ids, return_counts=True)
    kept = values[counts >= min_count]
    table = np.zeros(int(values.max()) + 1, dtype=np.int64)
    table[kept] = np.arange(1, kept.size + 1)
    return table


class IdLookup(nn.Module):
    """Raw id -> embedding row; negative, unseen or out-of-range ids -> UNKNOWN."""

    table: torch.Tensor

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.int64))
        self.size = int(table.max()) + 1 if table.size else 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.table.shape[0]
        inside = (ids >= 0) & (ids < n)
        return torch.where(inside, self.table[ids.clamp(0, n - 1)], torch.zeros_like(ids))


class Standardize(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def mlp(sizes: list[int], dropout: float, final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights."""

    architecture: str
    dense_names: tuple[str, ...]
    vocabularies: dict[str, np.ndarray]
    dense_mean: np.ndarray
    dense_std: np.ndarray
    config: ModelConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "dense_names": list(self.dense_names),
            "vocabularies": {k: v.tolist() for k, v in self.vocabularies.items()},
            "dense_mean": self.dense_mean.tolist(),
            "dense_std": self.dense_std.tolist(),
            "config": self.config.model_dump(mode="json"),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            architecture=data["architecture"],
            dense_names=tuple(data["dense_names"]),
            vocabularies={k: np.asarray(v, dtype=np.int64) for k, v in data["vocabularies"].items()},
            dense_mean=np.asarray(data["dense_mean"], dtype=np.float32),
            dense_std=np.asarray(data["dense_std"], dtype=np.float32),
            config=ModelConfig.model_validate(data["config"]),
        )


POSITION_BUCKETS = 64
"""Positions get their own learned bias up to this slot; later slots share the last one."""


class _Embedded(nn.Module):
    """Shared front: standardised dense features, one embedding per id column, and a position bias.

    Position never enters the feature network: it only adds a learned per-slot bias to the logit
    (a "shallow tower"). With click rates of a few percent, logit(examination x relevance) is
    close to log examination + logit relevance, so the rest of the model learns relevance alone,
    and serving at position 0 ranks by it without extrapolating the network to unseen slots.
    """

    feature_cols: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        dim = spec.config.embedding.dim
        self.position_col = spec.dense_names.index("position")
        features = [i for i in range(len(spec.dense_names)) if i != self.position_col]
        self.register_buffer("feature_cols", torch.tensor(features, dtype=torch.int64))
        self.position_bias = nn.Embedding(POSITION_BUCKETS, 1)
        nn.init.zeros_(self.position_bias.weight)
        keep = np.asarray(features)
        self.norm = Standardize(spec.dense_mean[keep], spec.dense_std[keep])
        # Only the configured id columns are embedded; the others are accepted and ignored, so the
        # input contract stays the same whichever ids a model learns from.
        self.embedded = [c for c in ID_COLUMNS if c in spec.config.embedding.columns]
        self.lookups = nn.ModuleDict({c: IdLookup(spec.vocabularies[c]) for c in self.embedded})
        self.embeddings = nn.ModuleDict(
            {c: nn.Embedding(self.lookups[c].size, dim) for c in self.embedded}  # type: ignore[arg-type]
        )
        for embedding in self.embeddings.values():
            nn.init.normal_(embedding.weight, std=0.05)  # type: ignore[arg-type]

    def embed(self, column: str, ids: torch.Tensor) -> torch.Tensor:
        embedded: torch.Tensor = self.embeddings[column](self.lookups[column](ids))
        return embedded

    def features(self, dense: torch.Tensor) -> torch.Tensor:
        """Standardised dense features without the position column."""
        normalised: torch.Tensor = self.norm(dense[:, self.feature_cols])
        return normalised

    def bias(self, dense: torch.Tensor) -> torch.Tensor:
        slot = dense[:, self.position_col].round().long().clamp(0, POSITION_BUCKETS - 1)
        bias: torch.Tensor = self.position_bias(slot).squeeze(1)
        return bias


class DLRM(_Embedded):
    """DLRM-style: bottom MLP on dense -> vector; pairwise dot products of all vectors; top MLP."""

    pairs: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        cfg, dim = spec.config.dlrm, spec.config.embedding.dim
        if cfg.bottom_mlp[-1] != dim:
            raise ValueError(f"dlrm.bottom_mlp must end with embedding.dim={dim}")
        self.bottom = mlp([len(spec.dense_names) - 1, *cfg.bottom_mlp], cfg.dropout, final_activation=True)
        n_vectors = 1 + len(self.embedded)
        i, j = torch.triu_indices(n_vectors, n_vectors, offset=1)
        # Flat positions of the upper triangle: one 1-D gather, cheaper in ONNX than 2-D indexing.
        self.register_buffer("pairs", i * n_vectors + j)
        self.top = mlp([dim + i.numel(), *cfg.top_mlp, 1], cfg.dropout, final_activation=False)

    def forward(
        self,
        dense: torch.Tensor,
        user_id: torch.Tensor,
        item_id: torch.Tensor,
        creator_id: torch.Tensor,
        topic_id: torch.Tensor,
    ) -> torch.Tensor:
        x = self.bottom(self.features(dense))
        ids = {"user_id": user_id, "item_id": item_id, "creator_id": creator_id, "topic_id": topic_id}
        vectors = torch.stack([x, *(self.embed(c, ids[c]) for c in self.embedded)], dim=1)
        interactions = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1).index_select(1, self.pairs)
        logits: torch.Tensor = self.top(torch.cat([x, interactions], dim=1)).squeeze(1)
        return logits + self.bias(dense)


class TwoTower(_Embedded):
    """User tower (user id, user_* features) and item tower (item, creator, topic, item_*/creator_*
    features) meet in a dot product; request context (position, age, affinity) adds a linear term.
    The towers can later serve candidate retrieval on their own."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        cfg, dim = spec.config.two_tower, spec.config.embedding.dim
        names = [n for n in spec.dense_names if n != "position"]
        user = [i for i, n in enumerate(names) if n.startswith("user_") and not n.startswith("user_topic_")]
        item = [i for i, n in enumerate(names) if n.startswith(("item_", "creator_")) and n != "item_age_log"]
        context = [i for i in range(len(names)) if i not in user and i not in item]
        self.user_cols: torch.Tensor
        self.item_cols: torch.Tensor
        self.context_cols: torch.Tensor
        self.register_buffer("user_cols", torch.tensor(user, dtype=torch.int64))
        self.register_buffer("item_cols", torch.tensor(item, dtype=torch.int64))
        self.register_buffer("context_cols", torch.tensor(context, dtype=torch.int64))
        self.user_ids = [c for c in self.embedded if c == "user_id"]
        self.item_ids = [c for c in self.embedded if c != "user_id"]
        self.user_tower = mlp(
            [dim * len(self.user_ids) + len(user), *cfg.tower_mlp], cfg.dropout, final_activation=False
        )
        self.item_tower = mlp(
            [dim * len(self.item_ids) + len(item), *cfg.tower_mlp], cfg.dropout, final_activation=False
        )
        self.context = nn.Linear(len(context), 1)

    def forward(
        self,
        dense: torch.Tensor,
        user_id: torch.Tensor,
        item_id: torch.Tensor,
        creator_id: torch.Tensor,
        topic_id: torch.Tensor,
    ) -> torch.Tensor:
        x = self.features(dense)
        ids = {"user_id": user_id, "item_id": item_id, "creator_id": creator_id, "topic_id": topic_id}
        u = self.user_tower(
            torch.cat([*(self.embed(c, ids[c]) for c in self.user_ids), x[:, self.user_cols]], dim=1)
        )
        v = self.item_tower(
            torch.cat([*(self.embed(c, ids[c]) for c in self.item_ids), x[:, self.item_cols]], dim=1)
        )
        logits: torch.Tensor = (u * v).sum(dim=1) + self.context(x[:, self.context_cols]).squeeze(1)
        return logits + self.bias(dense)


ARCHITECTURES: dict[str, type[nn.Module]] = {"dlrm": DLRM, "two_tower": TwoTower}


def build_model(spec: ModelSpec) -> nn.Module:
    return ARCHITECTURES[spec.architecture](spec)


class Scorer(nn.Module):
    """What is exported: the click probability, sigmoid of the model's logit."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        dense: torch.Tensor,
        user_id: torch.Tensor,
        item_id: torch.Tensor,
        creator_id: torch.Tensor,
        topic_id: torch.Tensor,
    ) -> torch.Tensor:
        return torch.sigmoid(self.model(dense, user_id, item_id, creator_id, topic_id))
