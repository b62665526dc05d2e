"""A monitoring run's report: the numbers as JSON and a one-page PNG people can read at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from shared.lake import write_json_atomic

LEVEL_COLOURS = {"ok": "tab:green", "warning": "tab:orange", "alert": "tab:red"}


def write(document: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(document, directory / "report.json")
    features = document.get("features") or []
    quality = document.get("quality") or []
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, max(4, 0.28 * len(features) + 1.5)))
    if features:
        names = [f["feature"] for f in features]
        left.barh(names, [f["psi"] for f in features], color=[LEVEL_COLOURS[f["level"]] for f in features])
        left.invert_yaxis()
        left.set(xlabel="PSI against the serving baseline", title="Feature drift")
    else:
        left.text(0.5, 0.5, document.get("status", ""), ha="center", va="center")
        left.set_axis_off()
    if quality:
        labels = [f"{q['variant']} v{q['model_version']}" for q in quality]
        right.bar(labels, [q["ctr_ratio"] for q in quality], color="tab:blue")
        if document.get("baseline_ctr_ratio"):
            right.axhline(
                document["baseline_ctr_ratio"], color="grey", linestyle="--", label="champion baseline"
            )
            right.legend()
        right.set(ylabel="clicks / oracle-expected clicks", title="Online quality (delayed labels)")
    else:
        right.set_axis_off()
    window = document.get("window", {})
    fig.suptitle(
        f"feedrank monitor {document.get('run_id', '')}: {window.get('start', '')} .. {window.get('end', '')}"
    )
    fig.tight_layout()
    path = directory / "report.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
