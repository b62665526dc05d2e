"""Plots logged with every run: people read curves faster than tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers have no display

import matplotlib.pyplot as plt
import numpy as np

from services.trainer.evaluate import EvaluationReport


def loss_curves(history: list[dict[str, float]], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["val_log_loss"] for h in history], marker="o", label="validation")
    left.set(xlabel="epoch", ylabel="log loss", title="Loss")
    left.legend()
    right.plot(epochs, [h["val_auc"] for h in history], marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel="AUC", title="Validation AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_diagram(report: EvaluationReport, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = 0.0
    for name, curve in report.reliability.items():
        filled = curve.counts > 0
        ece = report.metrics[name]["ece"]
        ax.plot(
            curve.mean_predicted[filled],
            curve.observed_rate[filled],
            marker="o",
            label=f"{name} (ECE {ece:.4f})",
        )
        top = max(
            top, float(np.nanmax(curve.mean_predicted[filled])), float(np.nanmax(curve.observed_rate[filled]))
        )
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="perfect")
    ax.set(
        xlabel="predicted P(click)",
        ylabel="observed click rate",
        title="Reliability (test, served positions)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def score_histograms(report: EvaluationReport, labels: np.ndarray, path: Path) -> Path:
    scorers = list(report.scores)
    fig, axes = plt.subplots(1, len(scorers), figsize=(4 * len(scorers), 3.5))
    for ax, name in zip(np.atleast_1d(axes), scorers, strict=True):
        ranking = report.scores[name].ranking
        bins = np.histogram_bin_edges(ranking, bins=40)
        ax.hist(ranking[labels == 0], bins=bins, alpha=0.6, density=True, label="not clicked")
        ax.hist(ranking[labels == 1], bins=bins, alpha=0.6, density=True, label="clicked")
        ax.set(title=f"{name} ranking score", xlabel="score")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
