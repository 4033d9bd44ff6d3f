"""The data-quality checks (staleness, coverage, continuity) on real SQLite stores, and their CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crypto_agent.errors import InputError, StoreError
from crypto_agent.quality import DataQualityReport, check_data
from crypto_agent.settings import Settings, load_settings
from crypto_agent.store import Candle, Store
from crypto_agent.universe import UNIVERSE

HOUR = 3_600_000
H1, H4 = HOUR, 4 * HOUR
# 2026-11-28 12:00 UTC: a H4 boundary. Tests pass `now` explicitly; only the CLI uses the clock.
T = int(datetime(2026, 11, 28, 12, 0, tzinfo=UTC).timestamp() * 1000)
CLI = Path(sys.executable).with_name("crypto-agent")


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CRYPTO_AGENT_* from the caller's environment, no crypto-agent.toml from the working folder."""
    for key in list(os.environ):
        if key.startswith("CRYPTO_AGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def candles(first_open: int, last_open: int, interval: int, skip: set[int] = frozenset()) -> list[Candle]:
    """Consecutive candles with open times first_open..last_open (inclusive), minus those in `skip`."""
    return [
        (t, 1.0, 1.1, 0.9, 1.05, 5.0, t + interval - 1, 5.0, 10)
        for t in range(first_open, last_open + 1, interval)
        if t not in skip
    ]


def settings_for(tmp_path: Path, symbols: list[str], **overrides) -> Settings:
    return load_settings(home=tmp_path, symbols=symbols, **overrides)


@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}")
    yield s
    s.close()


def fill_fresh(store: Store, symbol: str, now: int, days: int = 5) -> None:
    """Both timeframes complete up to the newest candle closed at `now`."""
    for interval, tf in ((H1, "1h"), (H4, "4h")):
        last = (now - interval) // interval * interval
        store.upsert_candles(symbol, tf, candles(last - days * 24 * HOUR, last, interval))


class TestFreshData:
    def test_complete_fresh_data_passes_every_check(self, store: Store, tmp_path: Path) -> None:
        symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
        now = T + 30 * 60_000
        for s in symbols:
            fill_fresh(store, s, now)
        report = check_data(store, settings_for(tmp_path, symbols), now_ms=now)
        assert report.ok and bool(report)
        assert report.checks == {"staleness": True, "coverage": True, "continuity": True}
        assert report.reasons == []
        assert report.failing_windows() == []
        assert report.fresh_symbols == 3 and report.coverage == 1.0
        assert len(report.series) == 6
        h1 = next(r for r in report.series if r.symbol == "BTCUSDT" and r.timeframe == "1h")
        assert h1.newest_open_ms == T - H1 and h1.age_hours == pytest.approx(0.5)
        h4 = next(r for r in report.series if r.symbol == "BTCUSDT" and r.timeframe == "4h")
        assert h4.newest_open_ms == T - H4 and h4.age_hours == pytest.approx(0.5)

    def test_report_is_json_ready(self, store: Store, tmp_path: Path) -> None:
        fill_fresh(store, "BTCUSDT", T)
        d = check_data(store, settings_for(tmp_path, ["BTCUSDT", "ETHUSDT"]), now_ms=T).to_dict()
        again = json.loads(json.dumps(d))
        assert again["ok"] is False
        assert set(again["checks"]) == {"staleness", "coverage", "continuity"}
        assert again["coverage"] == {"fresh_symbols": 1, "total_symbols": 2, "share": 0.5, "minimum": 0.95}
        assert again["limits"]["stale_hours"] == {"1h": 6.0, "4h": 24.0}
        assert again["failing_symbols"] == ["ETHUSDT"]
        failing = {(w["symbol"], w["timeframe"]) for w in again["failing_windows"]}
        assert failing == {("ETHUSDT", "1h"), ("ETHUSDT", "4h")}
        row = next(r for r in again["series"] if r["symbol"] == "ETHUSDT" and r["timeframe"] == "4h")
        assert row["reasons"] == ["H4 no data"] and row["newest_open"] is None


class TestStaleness:
    @staticmethod
    def _h4_series_closed(store: Store, newest_open: int) -> None:
        store.upsert_candles("BTCUSDT", "4h", candles(newest_open - 30 * H4, newest_open, H4))

    def test_h4_25_hours_old_fails_with_the_reason(self, store: Store, tmp_path: Path) -> None:
        newest = T - 10 * H4
        self._h4_series_closed(store, newest)
        now = newest + H4 + 25 * HOUR
        report = check_data(store, settings_for(tmp_path, ["BTCUSDT"]), now_ms=now, timeframes=["4h"])
        assert report.checks["staleness"] is False and not report.ok
        (row,) = report.series
        assert not row.fresh and row.age_hours == pytest.approx(25.0)
        assert row.reasons == ["H4 newest candle 25.0 h old (limit 24 h)"]
        assert report.failing_windows() == [("BTCUSDT", "4h", newest + H4, now)]
        assert report.reasons[0].startswith("staleness: 1 of 1 series stale (BTCUSDT H4 25.0 h")

    def test_h4_23_hours_old_passes(self, store: Store, tmp_path: Path) -> None:
        newest = T - 10 * H4
        self._h4_series_closed(store, newest)
        report = check_data(
            store, settings_for(tmp_path, ["BTCUSDT"]), now_ms=newest + H4 + 23 * HOUR, timeframes=["H4"]
        )
        assert report.ok, report.reasons
        assert report.series[0].age_hours == pytest.approx(23.0)

    def test_exactly_at_the_limit_is_stale(self, store: Store, tmp_path: Path) -> None:
        newest = T - 10 * H4
        self._h4_series_closed(store, newest)
        report = check_data(store, settings_for(tmp_path, ["BTCUSDT"]), now_ms=newest + H4 + 24 * HOUR,
                            timeframes=["4h"])
        assert report.checks["staleness"] is False

    def test_h1_limit_is_6_hours(self, store: Store, tmp_path: Path) -> None:
        newest = T - 20 * H1
        store.upsert_candles("BTCUSDT", "1h", candles(newest - 50 * H1, newest, H1))
        st = settings_for(tmp_path, ["BTCUSDT"])
        assert check_data(store, st, now_ms=newest + H1 + 5 * HOUR, timeframes=["1h"]).ok
        late = check_data(store, st, now_ms=newest + H1 + 7 * HOUR, timeframes=["1h"])
        assert late.series[0].reasons == ["H1 newest candle 7.0 h old (limit 6 h)"]

    def test_an_open_candle_does_not_make_a_series_fresh(self, store: Store, tmp_path: Path) -> None:
        newest_closed = T - 10 * H4
        self._h4_series_closed(store, newest_closed)
        now = newest_closed + H4 + 25 * HOUR
        in_progress = now // H4 * H4  # opened before now, closes after it
        store.upsert_candles("BTCUSDT", "4h", candles(in_progress, in_progress, H4))
        report = check_data(store, settings_for(tmp_path, ["BTCUSDT"]), now_ms=now, timeframes=["4h"])
        (row,) = report.series
        assert row.newest_open_ms == newest_closed and not row.fresh

    def test_limit_comes_from_settings(self, store: Store, tmp_path: Path) -> None:
        newest = T - 10 * H4
        self._h4_series_closed(store, newest)
        st = settings_for(tmp_path, ["BTCUSDT"], stale_h4_hours=30)
        assert check_data(store, st, now_ms=newest + H4 + 25 * HOUR, timeframes=["4h"]).ok

    def test_a_symbol_without_data_is_stale_and_backfills_the_initial_history(
        self, store: Store, tmp_path: Path
    ) -> None:
        st = settings_for(tmp_path, ["BTCUSDT"], initial_history_days=10)
        report = check_data(store, st, now_ms=T + 1234, timeframes=["1h"])
        (row,) = report.series
        assert row.newest_open_ms is None and row.age_hours is None and not row.fresh
        assert row.reasons == ["H1 no data"]
        assert report.failing_windows() == [("BTCUSDT", "1h", T - 10 * 24 * HOUR, T + 1234)]


class TestCoverage:
    @staticmethod
    def _universe(store: Store, stale: int, now: int) -> None:
        for i, symbol in enumerate(UNIVERSE):
            last = (now - H4) // H4 * H4 - (8 * H4 if i < stale else 0)  # 8 candles late: 32+ h old
            store.upsert_candles(symbol, "4h", candles(last - 9 * H4, last, H4))

    def test_57_of_60_fresh_meets_coverage_but_fails_staleness(self, store: Store, tmp_path: Path) -> None:
        self._universe(store, stale=3, now=T)
        report = check_data(store, settings_for(tmp_path, list(UNIVERSE)), now_ms=T, timeframes=["4h"])
        assert report.fresh_symbols == 57 and report.coverage == pytest.approx(0.95)
        assert report.checks == {"staleness": False, "coverage": True, "continuity": True}
        assert not report.ok
        assert report.failing_symbols == list(UNIVERSE[:3])
        assert [w[0] for w in report.failing_windows()] == list(UNIVERSE[:3])

    def test_56_of_60_fresh_fails_coverage(self, store: Store, tmp_path: Path) -> None:
        self._universe(store, stale=4, now=T)
        report = check_data(store, settings_for(tmp_path, list(UNIVERSE)), now_ms=T, timeframes=["4h"])
        assert report.fresh_symbols == 56
        assert report.checks["coverage"] is False
        assert any(r.startswith("coverage: 56 of 60 symbols fresh (93.3%") for r in report.reasons), report.reasons

    def test_a_symbol_counts_only_when_fresh_on_every_timeframe(self, store: Store, tmp_path: Path) -> None:
        fill_fresh(store, "BTCUSDT", T)
        fill_fresh(store, "ETHUSDT", T - 10 * HOUR)  # H4 still fresh, H1 10 h old
        report = check_data(store, settings_for(tmp_path, ["BTCUSDT", "ETHUSDT"]), now_ms=T)
        assert report.fresh_symbols == 1
        assert report.symbol_ok() == {"BTCUSDT": True, "ETHUSDT": False}
        eth = {r.timeframe: r.fresh for r in report.series_of("ETHUSDT")}
        assert eth == {"1h": False, "4h": True}

    def test_coverage_minimum_comes_from_settings(self, store: Store, tmp_path: Path) -> None:
        self._universe(store, stale=6, now=T)
        st = settings_for(tmp_path, list(UNIVERSE), coverage_min=0.9)
        assert check_data(store, st, now_ms=T, timeframes=["4h"]).checks["coverage"] is True


class TestContinuity:
    NOW = T + 10 * 60_000
    LAST = T - H1  # newest closed H1 candle at NOW

    def _h1_with_hole(self, store: Store, hole: list[int]) -> None:
        store.upsert_candles("BTCUSDT", "1h", candles(self.LAST - 100 * H1, self.LAST, H1, skip=set(hole)))

    def _check(self, store: Store, tmp_path: Path, **overrides) -> DataQualityReport:
        return check_data(store, settings_for(tmp_path, ["BTCUSDT"], **overrides), now_ms=self.NOW,
                          timeframes=["1h"])

    def test_a_gap_of_2_candles_passes(self, store: Store, tmp_path: Path) -> None:
        self._h1_with_hole(store, [T - 20 * H1, T - 19 * H1])
        report = self._check(store, tmp_path)
        assert report.ok, report.reasons
        assert report.series[0].gaps == []

    def test_a_gap_of_3_candles_fails_and_names_exactly_its_range(self, store: Store, tmp_path: Path) -> None:
        hole = [T - 21 * H1, T - 20 * H1, T - 19 * H1]  # 2026-11-27 15:00, 16:00, 17:00
        self._h1_with_hole(store, hole)
        report = self._check(store, tmp_path)
        assert report.checks == {"staleness": True, "coverage": True, "continuity": False}
        row = report.series[0]
        assert row.gaps == [(T - 21 * H1, T - 18 * H1)]
        assert row.missing_candles == 3
        assert row.reasons == ["H1 gap of 3 candles from 2026-11-27 15:00 to 18:00 UTC"]
        assert report.failing_windows() == [("BTCUSDT", "1h", T - 21 * H1, T - 18 * H1)]
        assert report.reasons == ["continuity: 1 gap(s) longer than 2 candles in the last 72 h (BTCUSDT H1)"]

    def test_a_gap_across_midnight_names_both_dates(self, store: Store, tmp_path: Path) -> None:
        self._h1_with_hole(store, [T - k * H1 for k in range(14, 9, -1)])  # 22:00 .. 02:00
        row = self._check(store, tmp_path).series[0]
        assert row.reasons == ["H1 gap of 5 candles from 2026-11-27 22:00 to 2026-11-28 03:00 UTC"]

    def test_every_gap_is_listed(self, store: Store, tmp_path: Path) -> None:
        self._h1_with_hole(store, [T - k * H1 for k in (40, 39, 38, 5, 4, 3, 2)])
        report = self._check(store, tmp_path)
        assert report.series[0].gaps == [(T - 40 * H1, T - 37 * H1), (T - 5 * H1, T - H1)]
        assert [w[2:] for w in report.failing_windows()] == [(T - 40 * H1, T - 37 * H1), (T - 5 * H1, T - H1)]

    def test_gaps_older_than_the_window_are_ignored(self, store: Store, tmp_path: Path) -> None:
        self._h1_with_hole(store, [T - 90 * H1, T - 89 * H1, T - 88 * H1, T - 87 * H1])
        assert self._check(store, tmp_path).ok

    def test_a_gap_across_the_window_start_counts_its_part_inside(self, store: Store, tmp_path: Path) -> None:
        window_start = self.NOW - 72 * HOUR  # on no boundary: the first candle inside opens at T - 71 h
        first_inside = T - 71 * H1
        assert first_inside >= window_start > first_inside - H1
        # Missing: 2 candles before the window and 3 inside -> a gap of 3 inside the window.
        self._h1_with_hole(store, [first_inside + k * H1 for k in range(-2, 3)])
        report = self._check(store, tmp_path)
        assert report.series[0].gaps == [(first_inside, first_inside + 3 * H1)]
        # With only 2 inside, it passes.
        store.upsert_candles("BTCUSDT", "1h", candles(first_inside + 2 * H1, first_inside + 2 * H1, H1))
        assert self._check(store, tmp_path).ok

    def test_missing_candles_after_the_newest_are_staleness_not_a_gap(self, store: Store, tmp_path: Path) -> None:
        # 5 H1 candles missing at the end: fresh enough (5.2 h < 6 h), and no continuity failure.
        store.upsert_candles("BTCUSDT", "1h", candles(self.LAST - 100 * H1, self.LAST - 5 * H1, H1))
        report = self._check(store, tmp_path)
        assert report.ok, report.reasons

    def test_a_hole_before_a_stored_open_candle_is_a_gap(self, store: Store, tmp_path: Path) -> None:
        store.upsert_candles("BTCUSDT", "1h", candles(self.LAST - 100 * H1, self.LAST - 4 * H1, H1))
        store.upsert_candles("BTCUSDT", "1h", candles(T, T, H1))  # the candle still open at NOW
        assert self._check(store, tmp_path).series[0].gaps == [(self.LAST - 3 * H1, T)]

    def test_a_series_that_starts_inside_the_window_has_no_leading_gap(self, store: Store, tmp_path: Path) -> None:
        store.upsert_candles("BTCUSDT", "1h", candles(self.LAST - 10 * H1, self.LAST, H1))
        assert self._check(store, tmp_path).ok

    def test_max_gap_and_window_come_from_settings(self, store: Store, tmp_path: Path) -> None:
        self._h1_with_hole(store, [T - 20 * H1])
        assert not self._check(store, tmp_path, max_gap_candles=0).ok
        assert self._check(store, tmp_path, max_gap_candles=0, continuity_window_hours=12).ok

    def test_stale_tail_and_gap_windows_are_merged_when_they_touch(self, store: Store, tmp_path: Path) -> None:
        # Newest closed candle 10 h old, then an open candle: the gap and the stale tail overlap.
        store.upsert_candles("BTCUSDT", "1h", candles(self.LAST - 100 * H1, self.LAST - 10 * H1, H1))
        store.upsert_candles("BTCUSDT", "1h", candles(T, T, H1))
        report = self._check(store, tmp_path)
        assert report.checks["staleness"] is False and report.checks["continuity"] is False
        assert report.failing_windows() == [("BTCUSDT", "1h", self.LAST - 9 * H1, self.NOW)]


class TestInputs:
    def test_unknown_timeframe_is_an_input_error(self, store: Store, tmp_path: Path) -> None:
        with pytest.raises(InputError, match="unknown timeframe '15m'"):
            check_data(store, settings_for(tmp_path, ["BTCUSDT"]), now_ms=T, timeframes=["15m"])

    def test_malformed_symbol_is_an_input_error(self, store: Store, tmp_path: Path) -> None:
        with pytest.raises(InputError, match="malformed symbol"):
            check_data(store, settings_for(tmp_path, ["BTCUSDT"]), now_ms=T, symbols=["btc-usdt"])

    def test_symbols_and_timeframes_narrow_the_check(self, store: Store, tmp_path: Path) -> None:
        fill_fresh(store, "ETHUSDT", T)
        report = check_data(store, settings_for(tmp_path, list(UNIVERSE)), now_ms=T,
                            symbols=["ethusdt", "ETHUSDT"], timeframes=["H1", "1h"])
        assert report.symbols == ["ETHUSDT"] and report.timeframes == ["1h"]
        assert report.ok

    def test_a_database_without_the_tables_is_a_store_error(self, tmp_path: Path) -> None:
        import sqlite3

        path = tmp_path / "other.db"
        sqlite3.connect(path).execute("CREATE TABLE unrelated (x)").connection.close()
        s = Store(f"sqlite:///{path}", create=False)
        try:
            with pytest.raises(StoreError, match="no such table"):
                check_data(s, settings_for(tmp_path, ["BTCUSDT"]), now_ms=T)
        finally:
            s.close()


# --- the CLI, as an operator runs it ---


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CRYPTO_AGENT_")}
    base.update({
        "CRYPTO_AGENT_HOME": str(tmp_path),
        "CRYPTO_AGENT_DB_PATH": str(tmp_path / "db" / "crypto_agent.db"),
        "CRYPTO_AGENT_SYMBOLS": "BTCUSDT,ETHUSDT",
        "COLUMNS": "200",
    })
    base.update(env or {})
    return subprocess.run(
        [str(CLI), *args], cwd=tmp_path, env=base, capture_output=True, text=True, timeout=60, check=False
    )


def fill_now(tmp_path: Path, symbols: list[str], stale: set[str] = frozenset()) -> None:
    """Fresh data by the wall clock (the CLI checks against now), except for `stale` symbols."""
    s = Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}")
    now = int(time.time() * 1000)
    for symbol in symbols:
        fill_fresh(s, symbol, now - (48 * HOUR if symbol in stale else 0), days=4)
    s.close()


class TestCheckDataCommand:
    def test_fresh_data_exits_0_with_a_table(self, tmp_path: Path) -> None:
        fill_now(tmp_path, ["BTCUSDT", "ETHUSDT"])
        r = run_cli(tmp_path, "check-data")
        assert r.returncode == 0, r.stderr + r.stdout
        assert "BTCUSDT" in r.stdout and "ETHUSDT" in r.stdout
        assert "PASS staleness" in r.stdout and "data quality: OK" in r.stdout

    def test_json_shape_and_exit_1_when_a_check_fails(self, tmp_path: Path) -> None:
        fill_now(tmp_path, ["BTCUSDT", "ETHUSDT"], stale={"ETHUSDT"})
        r = run_cli(tmp_path, "check-data", "--json")
        assert r.returncode == 1, r.stderr
        d = json.loads(r.stdout)
        assert d["ok"] is False
        assert d["checks"] == {"staleness": False, "coverage": False, "continuity": True}
        assert d["failing_symbols"] == ["ETHUSDT"]
        assert {w["timeframe"] for w in d["failing_windows"]} == {"1h", "4h"}
        assert {(s["symbol"], s["timeframe"]) for s in d["series"]} == {
            (s, tf) for s in ("BTCUSDT", "ETHUSDT") for tf in ("1h", "4h")
        }
        assert any("ETHUSDT H1" in reason for reason in d["reasons"])

    def test_symbols_and_timeframes_options(self, tmp_path: Path) -> None:
        fill_now(tmp_path, ["BTCUSDT", "ETHUSDT"], stale={"ETHUSDT"})
        r = run_cli(tmp_path, "check-data", "--json", "--symbols", "btcusdt", "--timeframes", "H4")
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert [(s["symbol"], s["timeframe"]) for s in d["series"]] == [("BTCUSDT", "4h")]

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--timeframes", "15m"], "unknown timeframe '15m'"),
            (["--symbols", "DOGEUSDT"], "not in the configured universe"),
            (["--symbols", "not a symbol"], "malformed symbol"),
        ],
    )
    def test_bad_input_exits_2(self, tmp_path: Path, args: list[str], message: str) -> None:
        fill_now(tmp_path, ["BTCUSDT"])
        r = run_cli(tmp_path, "check-data", *args)
        assert r.returncode == 2
        assert message in r.stderr and r.stderr.startswith("error:")

    def test_missing_database_exits_2_and_creates_nothing(self, tmp_path: Path) -> None:
        r = run_cli(tmp_path, "check-data")
        assert r.returncode == 2
        assert "does not exist" in r.stderr and "CRYPTO_AGENT_DB_PATH" in r.stderr
        assert not (tmp_path / "db").exists()


class TestCheckIntegrityCommand:
    def test_good_file_exits_0(self, tmp_path: Path) -> None:
        fill_now(tmp_path, ["BTCUSDT"])
        r = run_cli(tmp_path, "check-integrity")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("ok (quick_check)")
        full = run_cli(tmp_path, "check-integrity", "--full", "--json")
        assert full.returncode == 0
        assert json.loads(full.stdout) == {
            "ok": True, "mode": "integrity_check",
            "database": str(tmp_path / "db" / "crypto_agent.db"), "problems": [],
        }

    def test_corrupt_file_exits_1_with_the_problems(self, tmp_path: Path) -> None:
        fill_now(tmp_path, ["BTCUSDT", "ETHUSDT"])
        path = tmp_path / "db" / "crypto_agent.db"
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)
        r = run_cli(tmp_path, "check-integrity", "--json")
        assert r.returncode == 1
        d = json.loads(r.stdout)
        assert d["ok"] is False and d["mode"] == "quick_check" and d["problems"]
        text_run = run_cli(tmp_path, "check-integrity", "--full")
        assert text_run.returncode == 1
        assert text_run.stdout.startswith("CORRUPT (integrity_check)")

    def test_missing_database_exits_2_with_a_hint(self, tmp_path: Path) -> None:
        r = run_cli(tmp_path, "check-integrity")
        assert r.returncode == 2
        assert "does not exist" in r.stderr and "what to do:" in r.stderr
        assert not (tmp_path / "db").exists()
