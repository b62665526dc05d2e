"""Validation rules: each rule catches its own kind of bad event, and good events pass untouched."""

from __future__ import annotations

from typing import Any

import pytest

from shared.config import DataConfig
from shared.schemas import CATALOG_SCHEMA, EVENT_SCHEMA
from shared.timeutil import to_ms
from shared.validation import EVENT_RULES, ITEM_RULES, RuleContext, Validated, evaluate, records_to_table

NOW = "2026-01-05T12:00:00Z"


def good_event(**changes: Any) -> dict[str, Any]:
    event = {
        "event_id": "r1-0-c", "event_type": "click", "user_id": 1, "item_id": 2, "request_id": "r1",
        "position": 0, "ts": "2026-01-05T11:00:00Z", "dwell_ms": 1200,
    }  # fmt: skip
    event.update(changes)
    return {k: v for k, v in event.items() if v is not ...}


def check(
    config: DataConfig, records: list[Any], rules: Any = EVENT_RULES, schema: Any = EVENT_SCHEMA
) -> Validated:
    from datetime import datetime

    table, reasons = records_to_table(records, schema)
    ctx = RuleContext(config.validation, to_ms(datetime.fromisoformat(NOW)), to_ms(config.world.start))
    return evaluate(table, rules, ctx, reasons)


def reasons_of(config: DataConfig, event: Any) -> set[str]:
    result = check(config, [event])
    return set(result.invalid_reasons[0].split(";")) if result.invalid_rows else set()


def test_a_good_event_passes(tiny_config: DataConfig) -> None:
    result = check(
        tiny_config, [good_event(), good_event(event_id="r1-1-i", event_type="impression", dwell_ms=None)]
    )
    assert result.invalid_rows == []
    assert result.valid.num_rows == 2


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"event_id": ""}, "event_id_present"),
        ({"event_id": "x" * 500}, "event_id_length"),
        ({"event_type": "share"}, "event_type_known"),
        ({"user_id": -1}, "user_id_range"),
        ({"item_id": 10**15}, "item_id_range"),
        ({"request_id": ""}, "request_id_present"),
        ({"position": 10_000}, "position_range"),
        ({"position": -2}, "position_range"),
        ({"ts": "2025-06-01T00:00:00Z"}, "ts_not_before_world"),
        ({"ts": "2026-02-01T00:00:00Z"}, "ts_not_in_future"),
        ({"dwell_ms": None}, "dwell_only_on_clicks"),
        ({"event_type": "impression"}, "dwell_only_on_clicks"),
        ({"dwell_ms": -5}, "dwell_range"),
        ({"dwell_ms": 10**9}, "dwell_range"),
    ],
)
def test_each_rule_catches_its_case(tiny_config: DataConfig, changes: dict[str, Any], rule: str) -> None:
    assert rule in reasons_of(tiny_config, good_event(**changes))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"user_id": "17"}, "type:user_id"),
        ({"user_id": True}, "type:user_id"),
        ({"position": 1.5}, "type:position"),
        ({"ts": "yesterday"}, "type:ts"),
        ({"ts": "2026-01-05T11:00:00"}, "type:ts"),  # no timezone: ambiguous
        ({"user_id": 2**70}, "type:user_id"),
        ({"color": "red"}, "unknown_fields"),
    ],
)
def test_wrong_types_are_named(tiny_config: DataConfig, changes: dict[str, Any], reason: str) -> None:
    assert reason in reasons_of(tiny_config, good_event(**changes))


def test_missing_required_field_fails(tiny_config: DataConfig) -> None:
    assert "ts_present" in reasons_of(tiny_config, good_event(ts=...))


def test_non_object_is_quarantined_not_crashing(tiny_config: DataConfig) -> None:
    result = check(tiny_config, [42, "event", None, [1, 2], good_event()])
    assert result.invalid_rows == [0, 1, 2, 3]
    assert all("not_an_object" in r for r in result.invalid_reasons)
    assert result.valid.num_rows == 1


def test_epoch_millis_and_iso_timestamps_agree(tiny_config: DataConfig) -> None:
    iso = check(tiny_config, [good_event(ts="2026-01-05T11:00:00+00:00")]).valid
    epoch = check(tiny_config, [good_event(ts=1767610800000)]).valid
    assert iso["ts"].equals(epoch["ts"])


def test_failure_counts_per_rule(tiny_config: DataConfig) -> None:
    result = check(tiny_config, [good_event(user_id=-1), good_event(user_id=-2, position=-1), good_event()])
    assert result.rule_failures["user_id_range"] == 2
    assert result.rule_failures["position_range"] == 1
    assert result.invalid_reasons[1] == "user_id_range;position_range"


def test_catalog_rules(tiny_config: DataConfig) -> None:
    good = {"item_id": 1, "creator_id": 2, "topic_id": 3, "published_at": "2026-01-01T00:00:00Z"}
    bad = {**good, "topic_id": -1, "published_at": "2027-01-01T00:00:00Z"}
    result = check(tiny_config, [good, bad], ITEM_RULES, CATALOG_SCHEMA)
    assert result.valid.num_rows == 1
    assert result.invalid_reasons == ["topic_id_range;published_at_not_in_future"]


def test_rules_have_unique_names_and_descriptions() -> None:
    for rules in (EVENT_RULES, ITEM_RULES):
        names = [r.name for r in rules]
        assert len(names) == len(set(names))
        assert all(r.description for r in rules)
