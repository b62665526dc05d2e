"""The benchmark page is rendered from recorded figures, never typed: a run replaces its sections."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmarks.report import flatten, record


def test_nested_figures_become_dotted_rows() -> None:
    assert flatten({"a": 1, "b": {"c": 2.5, "d": [1, 2]}}) == [("a", 1), ("b.c", 2.5), ("b.d", [1, 2])]


def test_a_run_replaces_only_its_sections_and_stamps_them(tmp_path: Path) -> None:
    results, page = tmp_path / "benchmarks.json", tmp_path / "benchmarks.md"
    record({"etl": {"seconds": 30.0}, "loop": {"false_alarms": 3}}, results, page)
    record({"loop": {"false_alarms": 0, "knobs": {"taste_shift": {"detected": 1}}}}, results, page)
    stored = json.loads(results.read_text())
    assert stored["etl"]["figures"] == {"seconds": 30.0}
    assert stored["loop"]["figures"]["false_alarms"] == 0
    assert {"measured_at", "commit"} <= set(stored["loop"])
    text = page.read_text()
    assert "| `knobs.taste_shift.detected` | 1 |" in text
    assert "| `seconds` | 30 |" in text
    assert "Not measured yet: train, ranker." in text
