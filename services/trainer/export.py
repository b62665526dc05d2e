"""ONNX export, the ranker's input contract, and the parity check that gates registration."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from services.trainer.data import Split
from services.trainer.model import Scorer
from services.trainer.training import predict
from shared.features import ID_COLUMNS

INPUTS = ("dense", *ID_COLUMNS)
OUTPUT = "score"


class ParityError(RuntimeError):
    """ONNX Runtime and torch disagree beyond tolerance: the model is not registered."""


def contract(dense_names: tuple[str, ...], feature_version: str, architecture: str) -> dict[str, Any]:
    """What the ranker must feed the model and what it gets back. Saved with the model."""
    return {
        "inputs": [
            {
                "name": "dense",
                "dtype": "float32",
                "shape": ["batch", len(dense_names)],
                "columns": list(dense_names),
            },
            *({"name": c, "dtype": "int64", "shape": ["batch"]} for c in ID_COLUMNS),
        ],
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch"], "meaning": "P(click)"},
        "feature_version": feature_version,
        "architecture": architecture,
        "position_column": dense_names.index("position"),
        "serving_position": 0,
        "notes": "ids never seen in training map to a learned 'unknown' embedding inside the model",
    }


def export_onnx(model: nn.Module, path: Path, n_dense: int, opset: int) -> Path:
    """Export the probability head with a dynamic batch dimension."""
    scorer = Scorer(model).eval().cpu()
    batch = 4
    example = (
        torch.zeros(batch, n_dense, dtype=torch.float32),
        *(torch.zeros(batch, dtype=torch.int64) for _ in ID_COLUMNS),
    )
    batch_dim = torch.export.Dim("batch", min=1, max=1_000_000)
    dynamic_shapes = {"dense": {0: batch_dim}, **{c: {0: batch_dim} for c in ID_COLUMNS}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about renamed axes
        program = torch.onnx.export(
            scorer,
            example,
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=False)
    return path


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_scores(sess: ort.InferenceSession, dense: np.ndarray, ids: dict[str, np.ndarray]) -> np.ndarray:
    feeds = {
        "dense": np.ascontiguousarray(dense, dtype=np.float32),
        **{c: ids[c].astype(np.int64) for c in ID_COLUMNS},
    }
    (scores,) = sess.run([OUTPUT], feeds)
    return np.asarray(scores)


def parity_check(model: nn.Module, path: Path, split: Split, rows: int, tolerance: float) -> float:
    """Max |torch - onnxruntime| over held-out rows (plus unseen ids); raises ParityError above tolerance."""
    rng = np.random.default_rng(0)
    take = rng.choice(len(split), size=min(rows, len(split)), replace=False)
    sample = split.take(np.sort(take))
    ids = {c: v.copy() for c, v in sample.ids.items()}
    unseen = rng.random(len(sample)) < 0.1  # ids the vocabulary never saw must agree too
    for column in ("user_id", "item_id"):
        ids[column][unseen] = 10**9 + np.arange(int(unseen.sum()))
    expected = predict(model.cpu(), sample.dense, ids)
    got = onnx_scores(session(path), sample.dense, ids)
    diff = float(np.max(np.abs(expected - got))) if len(sample) else 0.0
    if not diff < tolerance:
        raise ParityError(f"ONNX parity failed: max |torch - onnxruntime| = {diff:.3g} >= {tolerance:g}")
    return diff
