"""Configuration: profiles merge over the base, typos fail loudly, durations read like prose."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.config import (
    ConfigError,
    DataConfig,
    format_duration,
    load_config,
    load_data_config,
    load_model_config,
    load_monitoring_config,
    parse_duration,
)
from shared.settings import REPO_CONFIG_DIR

DATA_YAML = REPO_CONFIG_DIR / "data.yaml"


@pytest.mark.parametrize("profile", ["default", "tiny", "bench"])
def test_every_shipped_profile_is_valid(profile: str) -> None:
    config = load_config(DataConfig, DATA_YAML, profile)
    assert config.world.n_users > 0


@pytest.mark.parametrize("profile", ["default", "tiny", "bench"])
def test_configs_of_a_profile_agree_with_each_other(profile: str) -> None:
    data = load_data_config(REPO_CONFIG_DIR, profile)
    model = load_model_config(REPO_CONFIG_DIR, profile)
    monitoring = load_monitoring_config(REPO_CONFIG_DIR, profile)
    windows = [parse_duration(w) for w in data.features.windows]
    assert model.evaluation.popularity_window in windows  # the baseline ranks by one of the features
    # a version's reference waits until its longest feature window has filled with its own traffic
    assert monitoring.windows.baseline_warmup >= max([*windows, data.features.long_window])


def test_profile_overrides_only_what_it_names() -> None:
    base = load_config(DataConfig, DATA_YAML, "default")
    tiny = load_config(DataConfig, DATA_YAML, "tiny")
    assert tiny.world.n_items < base.world.n_items  # what it names changes ...
    assert tiny.click_model == base.click_model  # ... untouched sections are inherited


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="n_userz"):
        load_config(DataConfig, DATA_YAML, "tiny", overrides={"world": {"n_userz": 5}})


def test_unknown_profile_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known: default, tiny, bench"):
        load_config(DataConfig, DATA_YAML, "huge")


def test_malformed_yaml_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "data.yaml"
    broken.write_text("world: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DataConfig, broken, "default")


def test_windows_must_increase() -> None:
    with pytest.raises(ValidationError, match="strictly increasing"):
        load_config(DataConfig, DATA_YAML, "tiny", overrides={"features": {"windows": ["1d", "1h"]}})


def test_naive_start_time_is_rejected() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        load_config(DataConfig, DATA_YAML, "tiny", overrides={"world": {"start": "2026-01-01T00:00:00"}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)), ("1h", timedelta(hours=1)),
     ("7d", timedelta(days=7)), ("250ms", timedelta(milliseconds=250)), (30, timedelta(seconds=30))],
)  # fmt: skip
def test_durations_parse(text: str | int, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_bad_duration_says_how_to_write_one() -> None:
    with pytest.raises(ValueError, match="use a number and one of"):
        parse_duration("a week")


def test_format_duration_inverts_parse() -> None:
    for text in ("1h", "1d", "7d", "90m", "45s"):
        assert format_duration(parse_duration(text)) == text
