"""Anomaly detection and capacity forecasting on known data: planted anomalies, known slopes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tasks.anomaly import baseline, clean, detect, read_csv_series, to_rate
from tasks.forecast import forecast
from tests.conftest import DATA
from workers.cli import cli

SERIES = DATA / "series"


def minutes(values: list[float], start: str = "2026-12-01T00:00:00Z") -> pd.Series:
    index = pd.date_range(start, periods=len(values), freq="min", tz="UTC")
    return pd.Series(values, index=index)


def test_planted_anomalies_are_found_exactly() -> None:
    found = detect(read_csv_series(str(SERIES / "latency.csv")), "mad", 3.0)

    assert [(a.timestamp.isoformat(), a.value) for a in found.anomalies] == [
        ("2025-12-01T00:50:00+00:00", 400.0),
        ("2025-12-01T02:30:00+00:00", 400.0),
    ]
    assert all(a.score > 3 for a in found.anomalies)


def test_zscore_finds_the_same_planted_points() -> None:
    found = detect(read_csv_series(str(SERIES / "latency.csv")), "zscore", 3.0)

    assert [a.value for a in found.anomalies] == [400.0, 400.0]


def test_too_few_points_score_nothing() -> None:
    found = detect(minutes([1.0, 2.0, 100.0]))

    assert found.anomalies == []
    assert found.skipped == "too few points: 3 (at least 8)"


def test_a_constant_series_divides_by_no_zero_and_a_jump_is_still_found() -> None:
    flat = detect(minutes([5.0] * 20))
    jump = detect(minutes([5.0] * 19 + [6.0]))

    assert flat.anomalies == [] and flat.scale is not None and flat.scale > 0
    assert [a.value for a in jump.anomalies] == [6.0]
    assert np.isfinite(jump.anomalies[0].score)


def test_non_finite_values_are_masked() -> None:
    values = [10.0] * 10 + [float("nan"), float("inf"), float("-inf")] + [10.0, 50.0]

    found = detect(minutes(values))

    assert found.points == 12
    assert [a.value for a in found.anomalies] == [50.0]


def test_gaps_keep_real_timestamps() -> None:
    index = pd.DatetimeIndex(
        [f"2026-12-01T00:{m:02d}:00Z" for m in (0, 1, 2, 3, 4, 5, 6, 7, 30, 59)]
    )
    series = pd.Series([1.0] * 9 + [9.0], index=index)

    [anomaly] = detect(series).anomalies

    assert anomaly.timestamp == pd.Timestamp("2026-12-01T00:59:00Z")


def test_unordered_and_repeated_timestamps_are_sorted_and_the_last_value_kept() -> None:
    minute = [f"2026-12-01T00:{m:02d}:00Z" for m in (3, 0, 2, 1, 2, 4, 5, 6, 7, 8)]
    series = pd.Series([4.0, 1.0, 99.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0, 40.0], index=minute)
    series.index = pd.DatetimeIndex(series.index)

    values = clean(series)
    [anomaly] = detect(series).anomalies

    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 40.0]
    assert values.index.is_monotonic_increasing and values.index.is_unique
    assert (anomaly.timestamp, anomaly.value) == (pd.Timestamp("2026-12-01T00:08:00Z"), 40.0)


@pytest.mark.parametrize(
    ("values", "center", "mad"),
    [([1.0, 2.0, 100.0, 3.0, 4.0], 3.0, 1.0), ([1.0, 100.0, 2.0, 3.0, 4.0, 5.0], 3.5, 1.5)],
)
def test_the_robust_baseline_is_the_median_and_scaled_mad(
    values: list[float], center: float, mad: float
) -> None:
    array = np.array(values)

    assert baseline(array, "mad") == (center, 1.4826 * mad)
    assert array.tolist() == values


def test_a_counter_becomes_a_rate_across_a_reset() -> None:
    index = pd.to_datetime([0, 10, 20, 30, 40], unit="s", utc=True)
    counter = pd.Series([100.0, 200.0, 300.0, 50.0, 150.0], index=index)

    rate = to_rate(counter)

    assert rate.tolist() == [10.0, 10.0, 5.0, 10.0]
    assert rate.index.tolist() == counter.index[1:].tolist()
    assert to_rate(counter.iloc[::-1]).tolist() == [10.0, 10.0, 5.0, 10.0]


def test_scoring_against_a_stored_baseline() -> None:
    found = detect(minutes([10.0, 11.0, 30.0]), against=(10.0, 2.0))

    assert [(a.value, a.score) for a in found.anomalies] == [(30.0, 10.0)]


def test_a_known_slope_gives_the_right_days_to_threshold() -> None:
    result = forecast(read_csv_series(str(SERIES / "disk.csv")), 90, threshold=90, capacity=100)

    # 40% growing 0.5 points a day: 69.5 on the last day, 90 is 41 days later.
    assert result.slope_per_day == pytest.approx(0.5)
    assert result.current == pytest.approx(69.5)
    assert result.days_to_threshold == pytest.approx(41.0)
    assert result.forecast == pytest.approx(114.5)
    assert result.lower <= result.forecast <= result.upper
    assert (result.level, result.advice) == ("critical", "increase now")


@pytest.mark.parametrize(
    ("last", "level"), [(95.0, "critical"), (80.0, "warning"), (65.0, "info"), (50.0, "ok")]
)
def test_levels_follow_the_forecast_share_of_capacity(last: float, level: str) -> None:
    flat = pd.Series([last] * 5, index=pd.date_range("2026-01-01", periods=5, freq="D", tz="UTC"))

    assert forecast(flat, 30, threshold=99, capacity=100).level == level


def test_a_falling_series_never_reaches_its_threshold() -> None:
    falling = pd.Series(
        [50.0, 40.0, 30.0], index=pd.date_range("2026-01-01", periods=3, freq="D", tz="UTC")
    )

    assert forecast(falling, 30, threshold=90).days_to_threshold is None


def test_cli_anomalies_as_json() -> None:
    result = CliRunner().invoke(
        cli, ["analyze", "anomalies", "--series", str(SERIES / "latency.csv"), "--json"]
    )

    body = json.loads(result.output)
    assert [a["value"] for a in body["anomalies"]] == [400.0, 400.0]
    assert body["method"] == "mad" and body["points"] == 200


def test_cli_capacity_as_json() -> None:
    result = CliRunner().invoke(
        cli,
        [
            "analyze",
            "capacity",
            "--series",
            str(SERIES / "disk.csv"),
            "--threshold",
            "90",
            "--capacity",
            "100",
            "--json",
        ],
    )

    body = json.loads(result.output)
    assert body["days_to_threshold"] == pytest.approx(41.0)
    assert body["level"] == "critical"


def test_cli_names_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,v\n1,2\n")

    result = CliRunner().invoke(cli, ["analyze", "anomalies", "--series", str(bad)])

    assert result.exit_code == 1
    assert "missing column(s) timestamp, value" in result.output


def test_a_mostly_constant_series_keeps_a_real_spread() -> None:
    # A 5xx rate that is 0 most of the time: MAD is 0, the spread must not be.
    values = [0.0] * 70 + [1.0] * 30
    found = detect(minutes(values))

    assert found.center == 0.0
    assert found.scale == pytest.approx(1.2533 * 0.3)
    assert found.anomalies == []
    assert [a.value for a in detect(minutes([*values, 9.0])).anomalies] == [9.0]


def test_a_counter_sampled_finer_than_it_is_scraped_gives_its_true_rate() -> None:
    # Scraped every 60 s at 10/s, queried every 15 s: each reading repeats four times.
    readings = [600.0 * (i // 4) for i in range(16)]
    index = pd.date_range("2026-12-01", periods=16, freq="15s", tz="UTC")

    rate = to_rate(pd.Series(readings, index=index))

    assert rate.tolist() == [10.0, 10.0, 10.0]
    assert rate.index.tolist() == index[[4, 8, 12]].tolist()


def test_epoch_milliseconds_are_told_from_seconds(tmp_path: Path) -> None:
    path = tmp_path / "ms.csv"
    path.write_text("timestamp,value\n1764547200000,1\n1764633600000,2\n1764720000000,3\n")

    series = read_csv_series(str(path))

    assert series.index[0] == pd.Timestamp("2025-12-01T00:00:00Z")
    assert forecast(series, 10, threshold=90).slope_per_day == pytest.approx(1.0)


def test_a_resource_full_now_is_not_ok_because_its_trend_falls() -> None:
    falling = pd.Series(
        [109.0, 106.0, 103.0, 100.0],
        index=pd.date_range("2026-01-01", periods=4, freq="D", tz="UTC"),
    )

    result = forecast(falling, 30, threshold=90, capacity=100)

    assert result.days_to_threshold == 0.0
    assert (result.level, result.advice) == ("critical", "increase now")


@pytest.mark.parametrize("name", ["horizon_days", "threshold", "capacity"])
def test_non_finite_forecast_arguments_are_refused(name: str) -> None:
    flat = minutes([1.0, 2.0, 3.0])
    arguments = {"horizon_days": 30.0, "threshold": 90.0, "capacity": 100.0} | {name: float("nan")}

    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        forecast(flat, **arguments)
