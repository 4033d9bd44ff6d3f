"""The collector and `crypto-agent collect`: real simulator on 127.0.0.1, real SQLite files, real processes."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto_agent.collector import backfill, closed_end_ms, collect, missing_ranges
from crypto_agent.errors import InputError, StoreLocked
from crypto_agent.exchange import (
    BinanceClient,
    ExchangeError,
    ExchangeUnreachable,
    IPBanned,
)
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store

pytestmark = pytest.mark.timeout(180)

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
HOUR_MS = 3_600_000
H4_MS = 4 * HOUR_MS
DAY_MS = 24 * HOUR_MS
CLI = [str(Path(sys.executable).parent / "crypto-agent")]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A simulator of three symbols of the universe."""
    with Simulator(host="127.0.0.1", port=0, symbols=SYMBOLS, seed=1, history_days=120) as s:
        yield s


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh SQLite store in tmp_path."""
    with Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}") as s:
        yield s


@pytest.fixture
def client(sim: Simulator) -> Iterator[BinanceClient]:
    with BinanceClient(sim.url, timeout_s=5, backoff_s=0.01, retries=2) as c:
        yield c


def kline_requests(sim: Simulator) -> int:
    return sim.stats()["requests"].get("/api/v3/klines", 0)


def stored(store: Store, symbol: str, tf: str) -> list[int]:
    return store.open_times(symbol, tf, 0, 2**62)


def delete(store: Store, table: str, symbol: str, open_times: list[int]) -> None:
    with sqlite3.connect(store.path) as conn:
        conn.executemany(f"DELETE FROM {table} WHERE symbol = ? AND timestamp = ?",
                         [(symbol, t) for t in open_times])


def test_missing_ranges_groups_contiguous_holes() -> None:
    assert missing_ranges(0, 10, 1, [0, 1, 4, 5, 9]) == [(2, 4), (6, 9)]
    assert missing_ranges(0, 6, 2, []) == [(0, 6)]
    assert missing_ranges(0, 6, 2, [0, 2, 4]) == []


class TestUpdate:
    def test_a_new_symbol_gets_the_initial_history_of_closed_candles(
        self, sim: Simulator, store: Store, client: BinanceClient
    ) -> None:
        now = client.server_time()
        summary = collect(store, client, ["BTCUSDT", "ETHUSDT"], ["1h", "4h"], initial_history_days=5, now_ms=now)
        assert summary.ok
        for symbol in ("BTCUSDT", "ETHUSDT"):
            end_h1, end_h4 = closed_end_ms(now, HOUR_MS), closed_end_ms(now, H4_MS)
            assert stored(store, symbol, "1h") == list(range(end_h1 - 5 * DAY_MS, end_h1, HOUR_MS))
            assert stored(store, symbol, "4h") == list(range(end_h4 - 5 * DAY_MS, end_h4, H4_MS))
            assert summary.written[(symbol, "1h")] == 120 and summary.written[(symbol, "4h")] == 30
        assert summary.total == 300
        assert summary.to_rows()[0] == ("BTCUSDT", "1h", 120)

    def test_update_continues_from_the_newest_stored_candle_and_a_rerun_writes_nothing(
        self, sim: Simulator, store: Store, client: BinanceClient
    ) -> None:
        now = client.server_time()
        collect(store, client, SYMBOLS, ["1h"], initial_history_days=3, now_ms=now)
        tail = stored(store, "SOLUSDT", "1h")[-7:]
        delete(store, "ohlcv_h1", "SOLUSDT", tail)
        before = kline_requests(sim)
        summary = collect(store, client, SYMBOLS, ["1h"], initial_history_days=3, now_ms=now)
        assert summary.written == {("BTCUSDT", "1h"): 0, ("ETHUSDT", "1h"): 0, ("SOLUSDT", "1h"): 7}
        assert stored(store, "SOLUSDT", "1h")[-7:] == tail
        assert kline_requests(sim) - before == 1  # only SOLUSDT had anything to fetch
        again = collect(store, client, SYMBOLS, ["1h"], initial_history_days=3, now_ms=now)
        assert again.ok and again.total == 0

    def test_update_does_not_fill_holes_but_update_all_fills_every_hole_not_only_the_tail(
        self, sim: Simulator, store: Store, client: BinanceClient
    ) -> None:
        now = client.server_time()
        collect(store, client, ["BTCUSDT"], ["1h", "4h"], initial_history_days=4, now_ms=now)
        full_h1 = stored(store, "BTCUSDT", "1h")
        full_h4 = stored(store, "BTCUSDT", "4h")
        holes_h1 = full_h1[10:13] + full_h1[40:41] + full_h1[60:70] + full_h1[-2:]
        delete(store, "ohlcv_h1", "BTCUSDT", holes_h1)
        delete(store, "ohlcv_h4", "BTCUSDT", full_h4[5:7])
        tail_only = collect(store, client, ["BTCUSDT"], ["1h", "4h"], now_ms=now)
        assert tail_only.written == {("BTCUSDT", "1h"): 2, ("BTCUSDT", "4h"): 0}
        before = kline_requests(sim)
        summary = collect(store, client, ["BTCUSDT"], ["1h", "4h"], mode="update-all", lookback_hours=96, now_ms=now)
        assert summary.written == {("BTCUSDT", "1h"): 14, ("BTCUSDT", "4h"): 2}
        assert kline_requests(sim) - before == 4  # one request per contiguous hole, nothing else
        assert stored(store, "BTCUSDT", "1h") == full_h1 and stored(store, "BTCUSDT", "4h") == full_h4
        assert collect(store, client, ["BTCUSDT"], ["1h", "4h"], mode="update-all", now_ms=now).total == 0

    def test_update_all_fills_holes_the_exchange_had_once_it_has_them(
        self, sim: Simulator, store: Store, client: BinanceClient
    ) -> None:
        now = client.server_time()
        end = closed_end_ms(now, HOUR_MS)
        gap = (end - 30 * HOUR_MS, end - 20 * HOUR_MS)
        sim.set_faults(gaps=[{"symbol": "ETHUSDT", "interval": "1h", "start_ms": gap[0], "end_ms": gap[1]}])
        first = collect(store, client, ["ETHUSDT", "BTCUSDT"], ["1h"], initial_history_days=2, now_ms=now)
        assert first.written == {("ETHUSDT", "1h"): 38, ("BTCUSDT", "1h"): 48}
        assert not set(range(*gap, HOUR_MS)) & set(stored(store, "ETHUSDT", "1h"))
        sim.clear_faults()
        summary = collect(store, client, ["ETHUSDT", "BTCUSDT"], ["1h"], mode="update-all", lookback_hours=48,
                          now_ms=now)
        assert summary.written == {("ETHUSDT", "1h"): 10, ("BTCUSDT", "1h"): 0}
        assert stored(store, "ETHUSDT", "1h") == list(range(end - 48 * HOUR_MS, end, HOUR_MS))

    def test_a_collect_of_many_pages_stays_under_a_small_weight_limit(self, store: Store) -> None:
        # 14 weight per 1 s window on both sides; 3 symbols x (3 pages of 1h + 1 of 4h) = 24 weight
        with Simulator(host="127.0.0.1", port=0, symbols=SYMBOLS, seed=1, history_days=120,
                       weight_limit=14, weight_window_s=1.0) as sim, \
                BinanceClient(sim.url, weight_limit=14, weight_window_s=1.0, timeout_s=5) as client:
            summary = collect(store, client, SYMBOLS, ["1h", "4h"], initial_history_days=100, workers=4)
            assert summary.ok and summary.total == 3 * (2400 + 600)
            assert kline_requests(sim) == 12
            assert {int(code) for code in sim.stats()["status"]} == {200}
            assert client.budget.waits > 0

    def test_backfill_fetches_exactly_the_windows_given(
        self, sim: Simulator, store: Store, client: BinanceClient
    ) -> None:
        now = client.server_time()
        end = closed_end_ms(now, H4_MS)
        windows = [("SOLUSDT", "4h", end - 10 * H4_MS, end - 6 * H4_MS), ("BTCUSDT", "1h", end - 5 * HOUR_MS, end)]
        summary = backfill(store, client, windows, now_ms=now)
        assert summary.written == {("SOLUSDT", "4h"): 4, ("BTCUSDT", "1h"): 5}
        assert stored(store, "SOLUSDT", "4h") == list(range(end - 10 * H4_MS, end - 6 * H4_MS, H4_MS))


class TestFailures:
    def test_a_symbol_the_exchange_does_not_know_is_reported_and_the_others_are_collected(
        self, sim: Simulator, store: Store, client: BinanceClient
    ) -> None:
        summary = collect(store, client, ["BTCUSDT", "TIAUSDT", "ETHUSDT"], ["1h", "4h"], initial_history_days=2)
        assert not summary.ok
        assert list(summary.failures) == ["TIAUSDT"] and "TIAUSDT" in summary.failures["TIAUSDT"]
        assert summary.written[("BTCUSDT", "1h")] == 48 and summary.written[("ETHUSDT", "4h")] == 12
        assert store.count("1h", "TIAUSDT") == 0

    def test_a_ban_stops_the_whole_run_at_once(self, sim: Simulator, store: Store, client: BinanceClient) -> None:
        now = client.server_time()
        sim.set_faults(ban_418_s=600)
        with pytest.raises(IPBanned) as info:
            collect(store, client, SYMBOLS, ["1h", "4h"], initial_history_days=2, now_ms=now, workers=2)
        # each worker sent at most its one request; nothing after the first 418
        assert kline_requests(sim) <= 2
        assert info.value.summary.aborted and "banned" in info.value.summary.aborted
        assert store.count("1h") == 0

    def test_an_unreachable_exchange_stops_the_run(self, sim: Simulator, store: Store, client: BinanceClient) -> None:
        now = client.server_time()
        sim.go_down("refuse")
        with pytest.raises(ExchangeUnreachable):
            collect(store, client, SYMBOLS, ["1h"], initial_history_days=2, now_ms=now, workers=1)
        assert store.count("1h") == 0

    def test_an_exchange_that_keeps_failing_stops_the_run_instead_of_trying_every_symbol(
        self, sim: Simulator, store: Store, client: BinanceClient
    ) -> None:
        now = client.server_time()
        sim.go_down("503")
        with pytest.raises(ExchangeError) as info:
            collect(store, client, SYMBOLS, ["1h", "4h"], initial_history_days=2, now_ms=now, workers=1)
        assert info.value.status == 503
        assert kline_requests(sim) == 3  # one symbol's attempts (retries=2), not every symbol's
        assert list(info.value.summary.failures) == ["BTCUSDT"]

    def test_nothing_is_written_while_a_recovery_holds_the_lock(
        self, sim: Simulator, store: Store, client: BinanceClient
    ) -> None:
        (store.path.parent / "LOCKED").touch()
        with pytest.raises(StoreLocked):
            collect(store, client, SYMBOLS, ["1h"], initial_history_days=2)
        assert kline_requests(sim) == 0 and store.count("1h") == 0
        summary = collect(store, client, ["BTCUSDT"], ["1h"], initial_history_days=2, lock_held=True)
        assert summary.total == 48

    @pytest.mark.parametrize(
        "kwargs",
        [{"mode": "everything"}, {"mode": "update-all", "lookback_hours": -1}, {"workers": 0}],
    )
    def test_bad_arguments_are_input_errors_before_any_request(
        self, sim: Simulator, store: Store, client: BinanceClient, kwargs: dict
    ) -> None:
        with pytest.raises(InputError):
            collect(store, client, SYMBOLS, ["1h"], **kwargs)
        with pytest.raises(InputError):
            collect(store, client, SYMBOLS, ["2h"])
        assert sum(sim.stats()["requests"].values()) == 0


# --- the command line, in real processes ---


def cli_env(home: Path, url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYPTO_AGENT_")}
    env.update(
        CRYPTO_AGENT_HOME=str(home),
        CRYPTO_AGENT_EXCHANGE_URL=url,
        CRYPTO_AGENT_SYMBOLS=",".join((*SYMBOLS, "TIAUSDT")),
        CRYPTO_AGENT_INITIAL_HISTORY_DAYS="3",
        CRYPTO_AGENT_RETRY_BACKOFF_S="0.01",
        CRYPTO_AGENT_REQUEST_RETRIES="1",
        CRYPTO_AGENT_REQUEST_TIMEOUT_S="5",
    )
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestCommand:
    def test_collect_writes_prints_the_summary_and_a_rerun_writes_nothing(
        self, sim: Simulator, tmp_path: Path
    ) -> None:
        env = cli_env(tmp_path, sim.url)
        first = run_cli(["collect", "--mode=update", "--symbols=BTCUSDT,ETHUSDT"], env, tmp_path)
        assert first.returncode == 0, first.stderr
        assert "BTCUSDT" in first.stdout and "ETHUSDT" in first.stdout
        assert "total: 180 candles written (1h: 144, 4h: 36)" in first.stdout
        with Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}") as s:
            assert s.count("1h", "BTCUSDT") == 72 and s.count("4h", "ETHUSDT") == 18
        again = run_cli(["collect", "--mode=update", "--symbols=BTCUSDT,ETHUSDT", "--timeframes=H1,h4"], env, tmp_path)
        assert again.returncode == 0, again.stderr
        assert "total: 0 candles written" in again.stdout

    def test_a_symbol_that_fails_exits_1_and_is_named_while_the_others_are_written(
        self, sim: Simulator, tmp_path: Path
    ) -> None:
        # TIAUSDT is in the configured universe but the exchange does not list it
        result = run_cli(["collect", "--timeframes=4h"], cli_env(tmp_path, sim.url), tmp_path)
        assert result.returncode == 1, result.stderr
        assert "failed: TIAUSDT" in result.stderr and "-1121" in result.stderr
        assert "remove it from `symbols`" in result.stderr and "the other 3 were collected" in result.stderr
        assert "total: 54 candles written" in result.stdout

    def test_two_collect_processes_at_once_write_each_candle_exactly_once(
        self, sim: Simulator, tmp_path: Path
    ) -> None:
        env = cli_env(tmp_path, sim.url, CRYPTO_AGENT_INITIAL_HISTORY_DAYS="60")
        args = ["collect", "--mode=update-all", f"--symbols={','.join(SYMBOLS)}", "--workers=2"]
        procs = [subprocess.Popen(CLI + args, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=150) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        db = tmp_path / "db" / "crypto_agent.db"
        with sqlite3.connect(db) as conn:
            for table, per_symbol in (("ohlcv_h1", 60 * 24), ("ohlcv_h4", 60 * 6)):
                rows = conn.execute(f"SELECT symbol, COUNT(*), COUNT(DISTINCT timestamp) FROM {table} "
                                    "GROUP BY symbol ORDER BY symbol").fetchall()
                assert rows == [(s, per_symbol, per_symbol) for s in sorted(SYMBOLS)]
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    @pytest.mark.parametrize(
        ("args", "extra_env", "message", "code"),
        [
            (["--symbols=BTCUSDT,DOGEUSDT"], {}, "unknown symbol 'DOGEUSDT'", 2),
            (["--symbols=BTC-USDT"], {}, "malformed symbol 'BTC-USDT'", 2),
            (["--timeframes=1h,2h"], {}, "unknown timeframe '2h'", 2),
            (["--mode=update-all", "--lookback-hours=-5"], {}, "--lookback-hours must be positive", 2),
            (["--mode=sideways"], {}, "unknown mode 'sideways'", 2),
            ([], {"CRYPTO_AGENT_DB_PATH": "/proc/x/y.db"}, "cannot create the database /proc/x/y.db", 1),
            (["--exchange-url=http://127.0.0.1:{port}"], {}, "cannot reach the exchange at http://127.0.0.1:", 1),
        ],
        ids=["unknown-symbol", "malformed-symbol", "unknown-timeframe", "negative-lookback", "unknown-mode",
             "unwritable-db", "unreachable-exchange"],
    )
    def test_bad_input_exits_non_zero_with_a_message_and_creates_no_database(
        self, sim: Simulator, tmp_path: Path, args: list[str], extra_env: dict, message: str, code: int
    ) -> None:
        args = [a.format(port=free_port()) for a in args]
        result = run_cli(["collect", *args], cli_env(tmp_path, sim.url, **extra_env), tmp_path)
        assert result.returncode == code, (result.stdout, result.stderr)
        assert message in result.stderr and "what to do:" in result.stderr
        assert not (tmp_path / "db").exists()
        assert list(tmp_path.iterdir()) == []
        assert kline_requests(sim) == 0
