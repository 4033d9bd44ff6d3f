"""The daily data jobs against the real simulator, a real SQLite store and the Prefect test server."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flow_kit import (
    TEST_HISTORY_DAYS,
    TEST_SYMBOLS,
    artifacts_of,
    flow_run_events,
    task_runs_of,
    wait_for_messages,
)
from sqlalchemy import func, select

import flows.daily as daily
from blocks.register import register_defaults
from crypto_agent import backup
from crypto_agent.schema import macro_series, sentimento_mercado
from crypto_agent.settings import load_settings
from crypto_agent.simulator import Simulator
from crypto_agent.store import open_store
from flows.events import STORE_OK, STORE_STALE, STORE_UPDATE_LATE

HOUR_MS = 3_600_000

Settings = Callable[..., dict[str, Any]]


def store_counts(settings: dict[str, Any]) -> dict[str, int]:
    with open_store(load_settings(**settings)) as store:
        return {tf: store.count(tf) for tf in ("1h", "4h")}


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same retry policy without the minutes of delay between attempts."""
    monkeypatch.setattr(daily, "collect_candles", daily.collect_candles.with_options(retry_delay_seconds=0))


class TestDataUpdate:
    def test_update_fills_the_store_for_every_symbol_and_timeframe(
        self, simulator: Simulator, settings_for: Settings
    ) -> None:
        settings = settings_for(simulator)
        state = daily.data_update(settings=settings, return_state=True)
        assert state.is_completed(), state.message
        result = state.result()
        counts = store_counts(settings)
        # 60 days of closed candles: about 24 * 60 H1 and 6 * 60 H4 per symbol
        assert counts["1h"] >= len(TEST_SYMBOLS) * 24 * (TEST_HISTORY_DAYS - 1)
        assert counts["4h"] >= len(TEST_SYMBOLS) * 6 * (TEST_HISTORY_DAYS - 1)
        assert result["written"] == counts["1h"] + counts["4h"]
        assert set(result["by_symbol"]) == set(TEST_SYMBOLS)

    def test_update_publishes_a_progress_and_a_per_symbol_table_artifact(
        self, simulator: Simulator, settings_for: Settings
    ) -> None:
        state = daily.data_update(settings=settings_for(simulator), return_state=True)
        run_id = state.state_details.flow_run_id
        [progress] = artifacts_of(run_id, "data-update-progress")
        [rows] = artifacts_of(run_id, "data-update-candles")
        assert progress == 100.0
        assert sorted(r["symbol"] for r in rows) == sorted(TEST_SYMBOLS)
        assert all(r["H1"] > 0 and r["H4"] > 0 and r["failure"] == "" for r in rows)

    def test_a_second_update_writes_only_what_is_new(self, simulator: Simulator, settings_for: Settings) -> None:
        settings = settings_for(simulator)
        daily.data_update(settings=settings)
        before = store_counts(settings)
        again = daily.data_update(settings=settings)
        after = store_counts(settings)
        # at most the candle or two that closed in between
        assert again["written"] == (after["1h"] - before["1h"]) + (after["4h"] - before["4h"])
        assert again["written"] <= 2 * len(TEST_SYMBOLS) * 2

    def test_the_first_successful_update_takes_the_first_backup_of_a_store_that_has_none(
        self, simulator: Simulator, settings_for: Settings
    ) -> None:
        settings = settings_for(simulator)
        backups = load_settings(**settings).backup_dir
        first = daily.data_update(settings=settings)
        [taken] = backup.list_backups(backups)
        assert first["first_backup"] == str(taken.path)
        assert taken.status == backup.GOOD and taken.tables["ohlcv_h4"] == store_counts(settings)["4h"]
        # a good backup exists: the next update takes none
        again = daily.data_update(settings=settings)
        assert again["first_backup"] is None
        assert [b.path for b in backup.list_backups(backups)] == [taken.path]

    def test_a_failed_update_takes_no_backup(self, simulator: Simulator, settings_for: Settings, inbox: Any) -> None:
        settings = settings_for(simulator)
        state = daily.data_update(symbols=["NOPEUSDT"], settings=settings, return_state=True)
        assert state.is_failed()
        assert backup.list_backups(load_settings(**settings).backup_dir) == []

    def test_a_418_ban_is_not_retried_and_the_failure_hook_tells_l1(
        self, simulator: Simulator, settings_for: Settings, inbox: Any, fast_retries: None
    ) -> None:
        simulator.set_faults(ban_418_s=600)
        state = daily.data_update(settings=settings_for(simulator), return_state=True)
        assert state.is_failed()
        assert "banned" in (state.message or "")
        runs = task_runs_of(state.state_details.flow_run_id)
        assert runs["collect-candles"].run_count == 1
        [message] = wait_for_messages(inbox, "/l1")
        assert message["body"]["subject"] == "[crypto-agent] data-update failed"
        assert "HTTP 418" in message["body"]["body"]
        assert str(state.state_details.flow_run_id) in message["body"]["body"]

    def test_a_429_the_client_will_not_wait_for_is_retried_by_the_task(
        self, simulator: Simulator, settings_for: Settings, fast_retries: None
    ) -> None:
        # One 429 asking for 5 s, more than this client waits: the client gives up, Prefect retries.
        simulator.set_faults(storm_429=1, retry_after_s=5)
        state = daily.data_update(settings=settings_for(simulator, max_retry_after_s=1), return_state=True)
        assert state.is_completed(), state.message
        runs = task_runs_of(state.state_details.flow_run_id)
        assert runs["collect-candles"].run_count == 2

    def test_a_bad_symbol_is_not_retried_and_the_others_are_written(
        self, simulator: Simulator, settings_for: Settings, fast_retries: None
    ) -> None:
        settings = settings_for(simulator)
        state = daily.data_update(symbols=["BTCUSDT", "NOPEUSDT"], settings=settings, return_state=True)
        assert state.is_failed()
        assert "NOPEUSDT" in (state.message or "")
        assert task_runs_of(state.state_details.flow_run_id)["collect-candles"].run_count == 1
        with open_store(load_settings(**settings)) as store:
            assert store.count("4h", "BTCUSDT") > 0


class TestDataUpdateDeadline:
    def test_a_run_completed_in_time_with_todays_candles_passes(
        self, simulator: Simulator, settings_for: Settings
    ) -> None:
        settings = settings_for(simulator)
        scheduled = datetime.now(UTC) - timedelta(seconds=30)
        daily.data_update(settings=settings)
        result = daily.data_update_deadline(scheduled_for=scheduled, grace_minutes=0.5, settings=settings)
        assert result["store_current"] is True
        assert len(result["completed_runs"]) >= 1

    def test_no_completed_run_by_the_deadline_alerts_and_emits_update_late(
        self, settings_for: Settings, inbox: Any
    ) -> None:
        # A deadline that passed long before any run of this session, and an empty store.
        scheduled = datetime.now(UTC) - timedelta(days=3)
        state = daily.data_update_deadline(scheduled_for=scheduled, settings=settings_for(), return_state=True)
        assert state.is_failed()
        assert "data-update is late" in (state.message or "")
        [event] = flow_run_events(state.state_details.flow_run_id, STORE_UPDATE_LATE)
        assert event.payload["completed_runs"] == []
        assert event.payload["store_current"] is False
        assert "detected_at" in event.payload
        [message] = wait_for_messages(inbox, "/l1")
        assert message["body"]["subject"] == "[crypto-agent] data-update-deadline failed"

    def test_the_default_schedule_is_the_last_0030_utc(self) -> None:
        at = datetime(2026, 3, 8, 0, 20, tzinfo=UTC)
        assert daily.last_scheduled_update(at) == datetime(2026, 3, 7, 0, 30, tzinfo=UTC)
        assert daily.last_scheduled_update(at + timedelta(minutes=15)) == datetime(2026, 3, 8, 0, 30, tzinfo=UTC)


class TestDataValidation:
    def test_a_fresh_complete_store_passes_and_emits_ok(self, simulator: Simulator, settings_for: Settings) -> None:
        settings = settings_for(simulator)
        daily.data_update(settings=settings)
        state = daily.data_validation(settings=settings, return_state=True)
        assert state.is_completed(), state.message
        assert state.result()["ok"] is True
        assert flow_run_events(state.state_details.flow_run_id, STORE_OK)
        [rows] = artifacts_of(state.state_details.flow_run_id, "data-validation")
        assert [r["symbol"] for r in rows] == TEST_SYMBOLS
        assert all(r["ok"] and r["H1 gaps"] == 0 for r in rows)

    def test_a_gap_in_the_exchange_fails_validation_and_emits_stale_with_the_window(
        self, simulator: Simulator, settings_for: Settings, inbox: Any
    ) -> None:
        settings = settings_for(simulator)
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        gap_start = (now_ms // HOUR_MS - 20) * HOUR_MS
        gap_end = gap_start + 6 * HOUR_MS  # six missing H1 candles: over the limit of 2
        simulator.set_faults(gaps=[{"symbol": "ETHUSDT", "interval": "1h", "start_ms": gap_start, "end_ms": gap_end}])
        assert daily.data_update(settings=settings)["written"] > 0

        state = daily.data_validation(settings=settings, return_state=True)

        assert state.is_failed()
        assert "continuity" in (state.message or "") or "gap" in (state.message or "")
        [event] = flow_run_events(state.state_details.flow_run_id, STORE_STALE)
        assert event.resource.id == "crypto-agent.store.main"
        assert event.payload["failing_symbols"] == ["ETHUSDT"]
        assert event.payload["failing_timeframes"] == ["1h"]
        assert event.payload["checks"]["continuity"] is False
        assert {"symbol": "ETHUSDT", "timeframe": "1h", "start_ms": gap_start, "end_ms": gap_end} in event.payload[
            "failing_windows"
        ]
        assert "detected_at" in event.payload
        assert wait_for_messages(inbox, "/l1")


class TestSentimentMacro:
    def test_without_a_fred_key_fear_greed_is_loaded_and_macro_skipped_with_a_warning(
        self, simulator: Simulator, settings_for: Settings
    ) -> None:
        settings = settings_for(simulator)
        state = daily.sentiment_macro_update(
            settings=settings, fred_secret_block="no-such-fred-key", return_state=True
        )
        assert state.is_completed(), state.message
        result = state.result()
        assert result["fred_skipped"] is True
        assert any("FRED skipped" in w for w in result["warnings"])
        with open_store(load_settings(**settings)) as store, store.engine.connect() as conn:
            days = conn.execute(select(func.count()).select_from(sentimento_mercado)).scalar()
            assert days == result["fear_greed_rows"] > 0
            assert conn.execute(select(func.count()).select_from(macro_series)).scalar() == 0
        [markdown] = artifacts_of(state.state_details.flow_run_id, "sentiment-macro-update")
        assert "FRED skipped" in markdown

    def test_with_a_fred_key_in_a_secret_block_macro_series_are_loaded_idempotently(
        self, simulator: Simulator, settings_for: Settings, receiver: Any
    ) -> None:
        settings = settings_for(simulator, fred_series=["DGS10", "CPIAUCSL"])
        from prefect.blocks.system import Secret

        Secret(value="a" * 32).save("fred-key-for-test", overwrite=True)
        first = daily.sentiment_macro_update(settings=settings, fred_secret_block="fred-key-for-test")
        second = daily.sentiment_macro_update(settings=settings, fred_secret_block="fred-key-for-test")
        assert first["fred_skipped"] is False
        assert set(first["fred_rows"]) == {"DGS10", "CPIAUCSL"} and first["fred_rows"]["DGS10"] > 0
        with open_store(load_settings(**settings)) as store, store.engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(macro_series)).scalar()
            days = conn.execute(select(func.count()).select_from(sentimento_mercado)).scalar()
        # the second run rewrote the same rows: nothing doubled
        assert stored == sum(first["fred_rows"].values())
        assert days == second["fear_greed_rows"]

    def test_the_registered_fred_secret_is_what_the_default_parameter_reads(
        self, simulator: Simulator, settings_for: Settings, receiver: Any
    ) -> None:
        register_defaults(load_settings(receiver_url=receiver.url), fred_api_key="b" * 32)
        try:
            result = daily.sentiment_macro_update(settings=settings_for(simulator, fred_series=["DFF"]))
            assert result["fred_skipped"] is False and result["fred_rows"]["DFF"] > 0
        finally:
            from prefect.blocks.system import Secret

            Secret.delete("fred-api-key")

    def test_an_unreachable_api_fails_the_run(self, settings_for: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(
            daily, "update_sentiment_and_macro", daily.update_sentiment_and_macro.with_options(retries=0)
        )
        closed = "http://127.0.0.1:9"
        state = daily.sentiment_macro_update(
            settings=settings_for(fear_greed_url=f"{closed}/fng/", fred_url=f"{closed}/fred"),
            fred_secret_block="no-such-fred-key",
            return_state=True,
        )
        assert state.is_failed()
        assert "Fear & Greed" in (state.message or "")
