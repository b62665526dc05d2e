"""Names the model registry's writers (trainer, monitor) and readers (ranker, monitor, CLIs) agree
on: aliases and tags of registered versions. Plain strings, no MLflow import, so that any service
may name them (the champion and challenger aliases are configured: config/model.yaml, registry).
"""

from __future__ import annotations

HISTORY_TAG = "feedrank.champion_history"
"""Registered-model tag: JSON list of the versions that were champion, oldest first."""

PROMOTED_AT_TAG = "feedrank.promoted_at"
"""Version tag: wall time (epoch seconds) of its latest promotion to champion."""

PIPELINE_RUN_TAG = "feedrank.pipeline_run"
"""Version (and MLflow run) tag: the training pipeline run that produced it."""

FEATURE_VERSION_TAG = "feature_version"
"""Version tag: the feature definitions' version the model reads (shared.features)."""

DATASET_TAG = "dataset_id"
"""Version tag: the offline dataset it was trained on (lake/features/<feature_version>/<id>)."""

CHALLENGER_SINCE_TAG = "feedrank.challenger_since_ms"
"""Version tag: sim time at which the version started serving as challenger."""

AB_RESULT_TAG = "feedrank.ab_result"
"""Version tag: won | lost, the outcome of its online A/B test."""

GATE_TAG = "feedrank.gate"
"""Version tag: failed | stale, when a candidate did not pass the offline gate."""

CANDIDATE_ALIAS = "candidate"
"""Alias of a freshly trained model waiting for the offline gate (champion and challenger aliases
are configured: model.yaml registry)."""
