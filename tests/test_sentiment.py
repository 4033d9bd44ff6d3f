"""Fear & Greed and FRED against the real simulator on 127.0.0.1, into a real SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from crypto_agent.errors import ConfigError
from crypto_agent.sentiment import (
    FredKeyError,
    SentimentError,
    update_fear_greed,
    update_fred,
    update_sentiment_macro,
)
from crypto_agent.settings import load_settings
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store

KEY = "abcdefghij0123456789abcdefghij01"
SERIES = ["DGS10", "DFF", "CPIAUCSL", "M2SL", "DTWEXBGS", "VIXCLS"]


@pytest.fixture(scope="module")
def sim():
    with Simulator(host="127.0.0.1", port=0, symbols=["BTCUSDT", "ETHUSDT"], seed=3, history_days=100,
                   fred_api_key=KEY) as s:
        yield s


@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}")
    yield s
    s.close()


def rows(store: Store, sql: str) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def settings_for(sim: Simulator, tmp_path: Path, **kw):
    return load_settings(home=tmp_path, fear_greed_url=f"{sim.url}/fng/", fred_url=f"{sim.url}/fred", **kw)


class TestFearGreed:
    def test_upserts_the_days_the_api_gives_and_is_idempotent(self, sim, store):
        assert update_fear_greed(store, f"{sim.url}/fng/", limit=30) == 30
        first = rows(store, "SELECT timestamp, date, value, classification FROM sentimento_mercado ORDER BY timestamp")
        assert update_fear_greed(store, f"{sim.url}/fng/", limit=30) == 30
        second = rows(store, "SELECT timestamp, date, value, classification FROM sentimento_mercado ORDER BY timestamp")
        assert first == second and len(first) == 30
        api = httpx.get(f"{sim.url}/fng/", params={"limit": 30}, timeout=10).json()["data"]
        expected = {datetime.fromtimestamp(int(d["timestamp"]), tz=UTC).date().isoformat():
                    (int(d["value"]), d["value_classification"]) for d in api}
        assert {r[1]: (r[2], r[3]) for r in first} == expected
        for ts, day, _, _ in first:
            assert datetime.fromtimestamp(ts / 1000, tz=UTC).date().isoformat() == day
            assert ts % 86_400_000 == 0

    def test_more_days_add_rows_without_duplicates(self, sim, store):
        update_fear_greed(store, f"{sim.url}/fng/", limit=10)
        update_fear_greed(store, f"{sim.url}/fng/", limit=40)
        assert rows(store, "SELECT COUNT(*), COUNT(DISTINCT date) FROM sentimento_mercado") == [(40, 40)]

    def test_a_body_without_data_is_a_clear_error(self, sim, store):
        with pytest.raises(SentimentError, match="sent no 'data' list") as exc:
            update_fear_greed(store, f"{sim.url}/api/v3/ping")
        assert exc.value.retryable
        assert rows(store, "SELECT COUNT(*) FROM sentimento_mercado") == [(0,)]


class TestFred:
    def test_loads_every_series_and_a_second_run_changes_nothing(self, sim, store):
        first = update_fred(store, f"{sim.url}/fred", KEY, SERIES)
        assert set(first) == set(SERIES) and all(n > 0 for n in first.values())
        snapshot = rows(store, "SELECT series_id, date, timestamp, value FROM macro_series ORDER BY 1, 2")
        assert len(snapshot) == sum(first.values())
        second = update_fred(store, f"{sim.url}/fred", KEY, SERIES)
        assert rows(store, "SELECT series_id, date, timestamp, value FROM macro_series ORDER BY 1, 2") == snapshot
        # the second run only re-reads the revision window, not the whole history
        assert second["DFF"] < first["DFF"]
        assert min(r[1] for r in snapshot if r[0] == "DFF") >= "2010-01-01"

    def test_a_dot_is_stored_as_null(self, sim, store):
        update_fred(store, f"{sim.url}/fred", KEY, ["DGS10"], start=date(2015, 1, 1))
        nulls = rows(store, "SELECT date FROM macro_series WHERE series_id='DGS10' AND value IS NULL")
        assert ("2015-12-25",) in nulls  # Christmas: no Treasury yield
        eve = rows(store, "SELECT value FROM macro_series WHERE series_id='DGS10' AND date='2015-12-24'")
        assert eve[0][0] is not None

    def test_a_bad_key_is_refused_without_leaking_it(self, sim, store):
        wrong = "zzzzzzzzzz0123456789zzzzzzzzzz99"
        with pytest.raises(FredKeyError, match="not registered") as exc:
            update_fred(store, f"{sim.url}/fred", wrong, SERIES)
        assert wrong not in str(exc.value) and "Secret block" in exc.value.hint
        assert not exc.value.retryable
        assert rows(store, "SELECT COUNT(*) FROM macro_series") == [(0,)]

    def test_an_unknown_series_fails_alone(self, sim, store):
        with pytest.raises(SentimentError, match="NOPE") as exc:
            update_fred(store, f"{sim.url}/fred", KEY, ["DGS10", "NOPE", "DFF"])
        assert "series does not exist" in exc.value.message and "written: DGS10" in exc.value.message
        assert not exc.value.retryable
        assert {r[0] for r in rows(store, "SELECT DISTINCT series_id FROM macro_series")} == {"DGS10", "DFF"}


class TestSentimentMacro:
    def test_without_a_key_fred_is_skipped_with_a_warning(self, sim, store, tmp_path, monkeypatch):
        monkeypatch.delenv("CRYPTO_AGENT_FRED_API_KEY", raising=False)
        summary = update_sentiment_macro(store, settings_for(sim, tmp_path))
        assert summary.ok and summary.fred_skipped and summary.fear_greed_rows == 30
        assert "FRED skipped: no API key" in summary.message
        assert "Fear & Greed: 30 days upserted into sentimento_mercado" in summary.message
        assert rows(store, "SELECT COUNT(*) FROM macro_series") == [(0,)]

    def test_the_key_comes_from_the_argument_or_the_settings(self, sim, store, tmp_path):
        summary = update_sentiment_macro(store, settings_for(sim, tmp_path, fred_series=["DFF"]), fred_api_key=KEY)
        assert not summary.fred_skipped and summary.fred_rows["DFF"] > 0
        summary = update_sentiment_macro(store, settings_for(sim, tmp_path, fred_series=["M2SL"], fred_api_key=KEY))
        assert summary.fred_rows["M2SL"] > 0 and "FRED:" in summary.message

    def test_a_bad_key_still_reports_what_fear_and_greed_did(self, sim, store, tmp_path):
        with pytest.raises(SentimentError) as exc:
            update_sentiment_macro(store, settings_for(sim, tmp_path), fred_api_key="wrong" * 6 + "00")
        assert exc.value.summary is not None and exc.value.summary.fear_greed_rows == 30
        assert "FRED refused the API key" in exc.value.message
        assert "Fear & Greed: 30 days" in exc.value.message
        assert rows(store, "SELECT COUNT(*) FROM sentimento_mercado") == [(30,)]

    def test_simulator_down_is_a_clear_retryable_error(self, store, tmp_path):
        with Simulator(host="127.0.0.1", port=0, symbols=["BTCUSDT"], seed=3, history_days=30) as down:
            down.go_down("refuse")
            with pytest.raises(SentimentError) as exc:
                update_sentiment_macro(store, settings_for(down, tmp_path), fred_api_key=KEY)
            assert exc.value.retryable and "cannot reach the Fear & Greed API" in exc.value.message
            assert "not tried: DFF" in exc.value.message  # FRED stops at the first refused connection
            assert KEY not in str(exc.value)
            down.come_up()
            down.go_down("503")
            with pytest.raises(SentimentError, match="answered HTTP 503") as exc:
                update_fear_greed(store, f"{down.url}/fng/")
            assert exc.value.retryable

    def test_malformed_series_setting_is_a_config_error(self, tmp_path):
        with pytest.raises(ConfigError, match="fred_series"):
            load_settings(home=tmp_path, fred_series="DGS10,bad id;rm")


class TestCli:
    def test_sentiment_update(self, sim, tmp_path):
        env = {**os.environ, "CRYPTO_AGENT_HOME": str(tmp_path), "CRYPTO_AGENT_FEAR_GREED_URL": f"{sim.url}/fng/",
               "CRYPTO_AGENT_FRED_URL": f"{sim.url}/fred", "CRYPTO_AGENT_FRED_SERIES": "DGS10,CPIAUCSL"}
        env.pop("CRYPTO_AGENT_FRED_API_KEY", None)
        env.pop("CRYPTO_AGENT_CONFIG", None)
        exe = str(Path(sys.executable).parent / "crypto-agent")
        r = subprocess.run([exe, "sentiment-update"], env=env, cwd=tmp_path, check=False, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Fear & Greed: 30 days" in r.stdout and "FRED skipped: no API key" in r.stdout
        r = subprocess.run([exe, "sentiment-update", "--fred-key", KEY], env=env, cwd=tmp_path, check=False,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "(DGS10 " in r.stdout and "CPIAUCSL " in r.stdout
        r = subprocess.run([exe, "sentiment-update", "--fred-key", "x" * 32], env=env, cwd=tmp_path, check=False,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "FRED refused the API key" in r.stderr and "x" * 32 not in r.stderr
