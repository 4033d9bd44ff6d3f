"""The backtest engine: strategies, metrics on hand-computed paths, no look-ahead, results table, lock, CLI."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from crypto_agent import backtest as bt
from crypto_agent.cli import main as cli_main
from crypto_agent.errors import InputError, StoreLocked
from crypto_agent.schema import backtest_results
from crypto_agent.store import Store, store_locked

H1 = 3_600_000
H4 = 4 * H1
START = 1_700_000_000_000 - 1_700_000_000_000 % H4  # a 4h-aligned open time in Nov 2023
FEE = 0.001  # 10 bps


def make_candles(closes, highs=None, lows=None, tf_ms: int = H1, start: int = START) -> pd.DataFrame:
    """Candles shaped like Store.candles(): columns, UTC DatetimeIndex of open times."""
    closes = np.asarray(closes, dtype=float)
    n = len(closes)
    opens = np.concatenate(([closes[0]], closes[:-1]))
    highs = np.maximum(opens, closes) if highs is None else np.asarray(highs, dtype=float)
    lows = np.minimum(opens, closes) if lows is None else np.asarray(lows, dtype=float)
    ts = start + np.arange(n, dtype=np.int64) * tf_ms
    df = pd.DataFrame({
        "symbol": "BTCUSDT", "timestamp": ts, "open": opens, "high": highs, "low": lows, "close": closes,
        "volume": 1.0, "close_time": ts + tf_ms - 1, "quote_volume": closes, "trades": 1,
    })
    df.index = pd.to_datetime(df["timestamp"], unit="ms", utc=True)
    df.index.name = "open_time"
    return df


def random_candles(n: int, seed: int, tf_ms: int = H1) -> pd.DataFrame:
    """A random-walk price path with highs and lows around it."""
    rng = np.random.default_rng(seed)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    opens = np.concatenate(([100.0], closes[:-1]))
    spread = 1 + np.abs(rng.normal(0, 0.004, n))
    return make_candles(closes, np.maximum(opens, closes) * spread, np.minimum(opens, closes) / spread, tf_ms)


def as_store_rows(df: pd.DataFrame) -> list[tuple]:
    """The candles of a DataFrame as Store.upsert_candles() rows."""
    return [
        (int(r.timestamp), r.open, r.high, r.low, r.close, r.volume, int(r.close_time), r.quote_volume, int(r.trades))
        for r in df.itertuples()
    ]


# --- reference implementations: plain loops, written from the definitions, independent of the engine ---


def loop_sma_cross(closes: list[float], fast: int, slow: int) -> list[int]:
    out = []
    for i in range(len(closes)):
        if i + 1 < slow:
            out.append(0)
            continue
        f = sum(closes[i + 1 - fast:i + 1]) / fast
        s = sum(closes[i + 1 - slow:i + 1]) / slow
        out.append(1 if f > s else 0)
    return out


def loop_rsi(closes: list[float], period: int) -> list[float]:
    rsi = [math.nan] * len(closes)
    gains = [max(closes[i] - closes[i - 1], 0.0) for i in range(1, len(closes))]
    losses = [max(closes[i - 1] - closes[i], 0.0) for i in range(1, len(closes))]
    if len(gains) < period:
        return rsi
    g, loss = sum(gains[:period]) / period, sum(losses[:period]) / period
    for i in range(period, len(closes)):
        if i > period:
            g = (g * (period - 1) + gains[i - 1]) / period
            loss = (loss * (period - 1) + losses[i - 1]) / period
        rsi[i] = math.nan if g + loss == 0 else 100 - 100 / (1 + g / loss) if loss > 0 else 100.0
    return rsi


def loop_rsi_reversion(closes: list[float], period: int, low: float, high: float) -> list[int]:
    state, out = 0, []
    for value in loop_rsi(closes, period):
        if value < low:
            state = 1
        elif value > high:
            state = 0
        out.append(state)
    return out


def loop_breakout(highs: list[float], lows: list[float], closes: list[float], lookback: int) -> list[int]:
    state, out = 0, []
    for i in range(len(closes)):
        if i >= lookback:
            if closes[i] > max(highs[i - lookback:i]):
                state = 1
            elif closes[i] < min(lows[i - lookback:i]):
                state = 0
        out.append(state)
    return out


def loop_metrics(closes: list[float], targets: list[int], fee: float, ppy: float) -> dict:
    equity, peak, worst, rets, held, trades, wins, entry = 1.0, 1.0, 0.0, [], 0, 0, 0, None
    if targets[0] == 1:
        equity *= 1 - fee
        entry = closes[0]
    for i in range(1, len(closes)):
        before = equity
        if targets[i - 1] == 1:
            equity *= closes[i] / closes[i - 1]
            held += 1
        if targets[i] != targets[i - 1]:
            equity *= 1 - fee
            if targets[i] == 1:
                entry = closes[i]
            else:
                trades += 1
                wins += closes[i] / entry * (1 - fee) ** 2 > 1
        if i == 1 and targets[0] == 1:
            before = 1.0
        rets.append(equity / before - 1)
        peak = max(peak, equity)
        worst = min(worst, equity / peak - 1)
    sd = statistics.stdev(rets)
    return {
        "total_return": equity - 1, "max_drawdown": worst, "trades": trades,
        "win_rate": wins / trades if trades else math.nan, "exposure": held / (len(closes) - 1),
        "sharpe": statistics.fmean(rets) / sd * math.sqrt(ppy) if sd > 0 else math.nan,
    }


# --- a path where SMA(2) / SMA(3) enters and exits at known candles ---
#            0   1   2   3   4   5   6   7  8  9  10  11  12  13  14  15
SMA_PATH = [10, 10, 10, 10, 13, 16, 12, 8, 8, 8, 10, 12, 14, 15, 16, 12]
# SMA2 > SMA3 at 4 (11.5 > 11), 5, 6; not at 7 (10 < 12); again from 10 (9 > 8.67) to 14 (15.5 > 15); not 15
SMA_TARGETS = [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0]


class TestSmaCrossOnAKnownPath:
    def test_positions_enter_and_exit_at_the_known_candles(self):
        got = bt.STRATEGIES["sma_cross"].positions(make_candles(SMA_PATH), fast=2, slow=3)
        assert got.tolist() == SMA_TARGETS
        assert got.index.equals(make_candles(SMA_PATH).index)

    def test_exact_trades_return_without_fees(self):
        r = bt.run_backtest(make_candles(SMA_PATH), "sma_cross", {"fast": 2, "slow": 3}, fee_bps=0)
        assert r.trades == 2  # bought 13 sold 8, bought 10 sold 12
        assert r.win_rate == 0.5
        assert r.total_return == pytest.approx(8 / 13 * 12 / 10 - 1, abs=1e-12)
        assert r.exposure == pytest.approx(8 / 15)  # held over periods 5-7 and 11-15: 8 of 15
        assert r.open_trade is False
        # peak 16/13 after candle 5, trough 8/13 after candle 7: a 50 % fall
        assert r.max_drawdown == pytest.approx(-0.5, abs=1e-12)

    def test_exact_total_return_with_fees_charged_on_each_of_the_four_fills(self):
        r = bt.run_backtest(make_candles(SMA_PATH), "sma_cross", {"fast": 2, "slow": 3}, fee_bps=10)
        assert r.total_return == pytest.approx(8 / 13 * 12 / 10 * (1 - FEE) ** 4 - 1, abs=1e-12)
        assert r.trades == 2 and r.win_rate == 0.5

    def test_a_fee_large_enough_turns_the_winning_trade_into_a_loser(self):
        # trade 2 earns 20 % gross; two fills of 10 % leave 1.2 * 0.81 = 0.972
        r = bt.run_backtest(make_candles(SMA_PATH), "sma_cross", {"fast": 2, "slow": 3}, fee_bps=1000)
        assert r.trades == 2 and r.win_rate == 0.0

    def test_start_and_end_are_the_open_times_of_the_first_and_last_candle(self):
        r = bt.run_backtest(make_candles(SMA_PATH), "sma_cross", {"fast": 2, "slow": 3})
        assert (r.start_ms, r.end_ms, r.candles) == (START, START + 15 * H1, 16)


class TestMetricsOfGivenPositions:
    PATH = (100, 120, 90, 108, 72, 150)

    def test_drawdown_of_a_known_path_is_the_worst_fall_from_the_running_peak(self):
        r = bt.evaluate_positions(make_candles(self.PATH), [1, 1, 1, 1, 1, 1], fee_bps=0)
        assert r.max_drawdown == pytest.approx(72 / 120 - 1)  # -0.4: the peak 120, the trough 72
        assert r.total_return == pytest.approx(0.5)
        assert r.exposure == 1.0 and r.trades == 0 and r.open_trade is True
        assert math.isnan(r.win_rate) and r.to_dict()["win_rate"] is None

    def test_sharpe_is_mean_over_stdev_of_the_period_returns_times_sqrt_periods_per_year(self):
        rets = [120 / 100 - 1, 90 / 120 - 1, 108 / 90 - 1, 72 / 108 - 1, 150 / 72 - 1]
        expected = statistics.fmean(rets) / statistics.stdev(rets) * math.sqrt(8760)
        r = bt.evaluate_positions(make_candles(self.PATH), [1] * 6, fee_bps=0)
        assert r.periods_per_year == 8760  # inferred from the hourly spacing
        assert r.sharpe == pytest.approx(expected, rel=1e-12)
        r4 = bt.evaluate_positions(make_candles(self.PATH, tf_ms=H4), [1] * 6, fee_bps=0)
        assert r4.sharpe == pytest.approx(expected / 2, rel=1e-12)  # sqrt(2190) = sqrt(8760) / 2

    def test_an_entry_at_the_first_candle_pays_its_fee_and_an_open_position_no_exit_fee(self):
        r = bt.evaluate_positions(make_candles(self.PATH), [1] * 6, fee_bps=10)
        assert r.total_return == pytest.approx(1.5 * (1 - FEE) - 1, abs=1e-12)

    def test_never_in_position_earns_nothing_and_has_no_sharpe(self):
        r = bt.evaluate_positions(make_candles(self.PATH), [0] * 6)
        assert (r.total_return, r.max_drawdown, r.trades, r.exposure) == (0.0, 0.0, 0, 0.0)
        assert math.isnan(r.sharpe) and r.to_dict()["sharpe"] is None

    def test_a_position_held_only_across_the_crash_has_the_crash_as_drawdown(self):
        # enter at 108 (candle 3), exit at 72 (candle 4): one losing trade of -1/3
        r = bt.evaluate_positions(make_candles(self.PATH), [0, 0, 0, 1, 0, 0], fee_bps=0)
        assert r.trades == 1 and r.win_rate == 0.0
        assert r.total_return == pytest.approx(-1 / 3) and r.max_drawdown == pytest.approx(-1 / 3)
        assert r.exposure == pytest.approx(1 / 5)

    def test_given_periods_per_year_overrides_the_inferred_one(self):
        r = bt.run_backtest(make_candles(SMA_PATH), "sma_cross", {"fast": 2, "slow": 3}, periods_per_year=365)
        assert r.periods_per_year == 365


class TestStrategiesAgainstPlainLoops:
    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_every_strategy_and_metric_matches_a_plain_loop(self, seed):
        df = random_candles(1500, seed)
        closes, highs, lows = df["close"].tolist(), df["high"].tolist(), df["low"].tolist()
        cases = [
            ("sma_cross", {"fast": 10, "slow": 30}, loop_sma_cross(closes, 10, 30)),
            ("rsi_reversion", {"period": 14, "low": 30, "high": 70}, loop_rsi_reversion(closes, 14, 30, 70)),
            ("breakout", {"lookback": 20}, loop_breakout(highs, lows, closes, 20)),
        ]
        for name, params, expected_targets in cases:
            got = bt.STRATEGIES[name].positions(df, **params)
            assert got.tolist() == expected_targets, name
            assert sum(expected_targets) > 0, f"{name} never entered: the comparison would prove little"
            r = bt.run_backtest(df, name, params, fee_bps=10)
            ref = loop_metrics(closes, expected_targets, FEE, 8760)
            assert r.trades == ref["trades"] > 0, name
            for key in ("total_return", "max_drawdown", "win_rate", "exposure", "sharpe"):
                assert getattr(r, key) == pytest.approx(ref[key], rel=1e-9, abs=1e-12), (name, key)

    def test_rsi_is_wilders(self):
        closes = random_candles(300, 7)["close"]
        ours = bt.rsi(closes, 14).to_numpy()
        ref = np.array(loop_rsi(closes.tolist(), 14))
        assert np.isnan(ours[:14]).all() and np.isnan(ref[:14]).all()
        np.testing.assert_allclose(ours[14:], ref[14:], rtol=1e-10)

    def test_rsi_reversion_buys_a_fall_and_sells_a_rise(self):
        path = [100, 99, 98, 97, 96, 97, 98, 99, 100, 101]
        got = bt.STRATEGIES["rsi_reversion"].positions(make_candles(path), period=2, low=30, high=70)
        # RSI is 0 from candle 2 (falls only), then climbs above 70 at the second up-move (candle 6)
        assert got.tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]

    def test_breakout_enters_above_the_previous_highs_and_leaves_below_their_lows(self):
        closes = [10, 10, 10, 11, 12, 11, 9, 9]
        got = bt.STRATEGIES["breakout"].positions(make_candles(closes, closes, closes), lookback=2)
        # 11 > max(10, 10) at 3; holds; 9 < min(12, 11) at 6
        assert got.tolist() == [0, 0, 0, 1, 1, 1, 0, 0]


class TestNoLookAhead:
    @pytest.mark.parametrize("name", list(bt.STRATEGIES))
    def test_changing_the_last_candle_never_changes_the_positions_before_it(self, name):
        df = random_candles(600, 11)
        before = bt.STRATEGIES[name].positions(df, **bt.STRATEGIES[name].defaults)
        for factor in (0.5, 2.0):
            changed = df.copy()
            last = changed.index[-1]
            for col in ("close", "high", "low"):
                changed.loc[last, col] = changed.loc[last, col] * factor
            after = bt.STRATEGIES[name].positions(changed, **bt.STRATEGIES[name].defaults)
            assert after.iloc[:-1].tolist() == before.iloc[:-1].tolist()

    @pytest.mark.parametrize("name", list(bt.STRATEGIES))
    def test_positions_on_a_prefix_equal_the_prefix_of_the_positions(self, name):
        df = random_candles(400, 12)
        full = bt.STRATEGIES[name].positions(df, **bt.STRATEGIES[name].defaults).tolist()
        for k in (60, 137, 250, 399):
            assert bt.latest_signal(df.iloc[:k], name) == full[k - 1]
            assert bt.STRATEGIES[name].positions(df.iloc[:k], **bt.STRATEGIES[name].defaults).tolist() == full[:k]

    def test_a_return_is_earned_only_from_the_candle_after_the_signal(self):
        # a jump on the very candle the target turns 1 is not earned; the next one is
        r = bt.evaluate_positions(make_candles([10, 20, 40]), [0, 1, 1], fee_bps=0)
        assert r.total_return == pytest.approx(1.0)  # 20 -> 40 only


class TestDeterminismAndSignals:
    def test_the_same_data_gives_the_same_result(self):
        df = random_candles(2000, 5)
        for name in bt.STRATEGIES:
            a = bt.run_backtest(df, name).to_dict()
            b = bt.run_backtest(df.copy(), name).to_dict()
            assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    def test_latest_signal_skips_a_candle_still_forming_when_now_is_given(self):
        df = make_candles(SMA_PATH)
        # at candle 15's close the target is 0; at candle 14's it is 1
        assert bt.latest_signal(df, "sma_cross", {"fast": 2, "slow": 3}) == 0
        forming = int(df["close_time"].iloc[-1])  # candle 15 closes at this ms: not yet past
        assert bt.latest_signal(df, "sma_cross", {"fast": 2, "slow": 3}, now_ms=forming) == 1
        assert bt.latest_signal(df.iloc[:0], "sma_cross") == 0


class TestBadInput:
    def test_unknown_strategy_names_the_valid_ones(self):
        with pytest.raises(InputError) as e:
            bt.run_backtest(make_candles(SMA_PATH), "macd")
        assert "sma_cross, rsi_reversion, breakout" in str(e.value) and e.value.exit_code == 2

    @pytest.mark.parametrize(("params", "text"), [
        ({"fats": 3}, "unknown parameter(s) fats"),
        ({"fast": 5, "slow": 5}, "1 <= fast < slow"),
        ({"fast": 2.5}, "must be an integer"),
        ({"fast": "x"}, "must be an integer"),
        ({"fast": True}, "must be an integer"),
    ])
    def test_bad_params_are_refused(self, params, text):
        with pytest.raises(InputError) as e:
            bt.run_backtest(make_candles(SMA_PATH), "sma_cross", params)
        assert text in str(e.value)

    def test_params_are_typed_like_their_defaults(self):
        assert bt.resolve_params("sma_cross", {"fast": "10", "slow": 30.0}) == {"fast": 10, "slow": 30}
        assert bt.resolve_params("rsi_reversion", {"low": "25"}) == {"period": 14, "low": 25.0, "high": 70.0}
        with pytest.raises(InputError, match="low < high"):
            bt.resolve_params("rsi_reversion", {"low": 80})

    @pytest.mark.parametrize(("candles", "text"), [
        (make_candles([10.0]), "at least 2 candles"),
        (make_candles([10.0, 11.0, 12.0]).iloc[::-1], "increasing"),
        (make_candles([10.0, -1.0, 12.0]), "non-positive"),
    ])
    def test_bad_candles_are_refused(self, candles, text):
        with pytest.raises(InputError, match=text):
            bt.run_backtest(candles, "breakout", {"lookback": 1})

    def test_bad_fee_is_refused(self):
        with pytest.raises(InputError, match="fee_bps"):
            bt.run_backtest(make_candles(SMA_PATH), "sma_cross", fee_bps=-1)


# --- the store: results table, run_unit, the lock ---


@pytest.fixture
def store(tmp_path: Path):
    """A real SQLite store with 400 4h candles of BTCUSDT and 30 of ETHUSDT."""
    s = Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}")
    s.upsert_candles("BTCUSDT", "4h", as_store_rows(random_candles(400, 21, H4)))
    s.upsert_candles("ETHUSDT", "4h", as_store_rows(random_candles(30, 22, H4)))
    yield s
    s.close()


def row_count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(backtest_results)).scalar())


class TestResultsTable:
    def test_run_unit_saves_one_row_that_reads_back_with_the_metrics(self, store):
        r = bt.run_unit(store, "BTCUSDT", "4h", "sma_cross", "run-1", {"fast": 10})
        assert r is not None and r.candles == 400 and r.periods_per_year == 2190
        rows = bt.results(store, run_id="run-1")
        assert len(rows) == 1
        row = rows.iloc[0]
        assert (row.run_id, row.strategy, row.symbol, row.timeframe) == ("run-1", "sma_cross", "BTCUSDT", "4h")
        assert json.loads(row.params) == {"fast": 10, "slow": 50}
        assert (row.period_start, row.period_end, row.candles) == (START, START + 399 * H4, 400)
        for key in ("total_return", "sharpe", "max_drawdown", "win_rate", "exposure"):
            assert row[key] == pytest.approx(getattr(r, key), rel=1e-15), key
        assert row.trades == r.trades and row.fee_bps == 10.0 and row.created_at > 1_700_000_000_000
        # the same as running the engine on the stored candles directly
        direct = bt.run_backtest(store.candles("BTCUSDT", "4h"), "sma_cross", {"fast": 10})
        assert direct == r

    def test_results_filters_and_orders_newest_first(self, store):
        bt.run_unit(store, "BTCUSDT", "4h", "sma_cross", "a")
        bt.run_unit(store, "BTCUSDT", "4h", "breakout", "b")
        bt.run_unit(store, "BTCUSDT", "4h", "rsi_reversion", "b")
        assert bt.results(store)["strategy"].tolist() == ["rsi_reversion", "breakout", "sma_cross"]
        assert len(bt.results(store, run_id="b")) == 2
        assert len(bt.results(store, limit=1)) == 1
        assert bt.results(store, symbol="ETHUSDT").empty
        assert list(bt.results(store, symbol="ETHUSDT").columns) == [c.name for c in backtest_results.columns]

    def test_undefined_metrics_are_stored_as_null(self, store):
        flat = bt.evaluate_positions(store.candles("BTCUSDT", "4h"), np.zeros(400))
        bt.save_result(store, "flat", "custom", "BTCUSDT", "4h", {"k": 1}, flat)
        row = bt.results(store, run_id="flat").iloc[0]
        assert row.sharpe is None or math.isnan(row.sharpe)
        assert row.win_rate is None or math.isnan(row.win_rate)
        assert json.loads(row.params) == {"k": 1}

    def test_too_little_data_returns_none_and_writes_nothing(self, store):
        assert bt.run_unit(store, "ETHUSDT", "4h", "sma_cross", "r") is None  # 30 < 51 candles
        assert bt.run_unit(store, "SOLUSDT", "4h", "sma_cross", "r") is None  # nothing stored
        assert bt.run_unit(store, "ETHUSDT", "4h", "sma_cross", "r", {"fast": 5, "slow": 10}) is not None
        assert row_count(store) == 1

    def test_lookback_days_keeps_exactly_the_last_days_up_to_the_newest_candle(self, store):
        r = bt.run_unit(store, "BTCUSDT", "4h", "breakout", "r", lookback_days=30)
        assert r.candles == 30 * 6 and r.end_ms == START + 399 * H4
        assert r.start_ms == START + (400 - 180) * H4

    def test_bad_inputs_raise_and_write_nothing(self, store):
        for call in (
            lambda: bt.run_unit(store, "BTC/USDT", "4h", "sma_cross", "r"),
            lambda: bt.run_unit(store, "BTCUSDT", "15m", "sma_cross", "r"),
            lambda: bt.run_unit(store, "BTCUSDT", "4h", "nope", "r"),
            lambda: bt.run_unit(store, "BTCUSDT", "4h", "sma_cross", "r", {"fats": 1}),
            lambda: bt.run_unit(store, "BTCUSDT", "4h", "sma_cross", ""),
            lambda: bt.run_unit(store, "BTCUSDT", "4h", "sma_cross", "r", lookback_days=-1),
        ):
            with pytest.raises(InputError):
                call()
        assert row_count(store) == 0


class TestLock:
    def test_the_locked_file_blocks_run_unit_and_save_result(self, store):
        lock = store.path.parent / "LOCKED"
        assert not store_locked(store)
        lock.touch()
        assert store_locked(store)
        with pytest.raises(StoreLocked) as e:
            bt.run_unit(store, "BTCUSDT", "4h", "sma_cross", "r")
        assert "LOCKED" in str(e.value)
        result = bt.run_backtest(store.candles("BTCUSDT", "4h"), "sma_cross")  # reading stays allowed
        with pytest.raises(StoreLocked):
            bt.save_result(store, "r", "sma_cross", "BTCUSDT", "4h", None, result)
        assert row_count(store) == 0
        lock.unlink()
        assert bt.run_unit(store, "BTCUSDT", "4h", "sma_cross", "r") is not None
        assert row_count(store) == 1

    def test_an_in_memory_store_is_never_locked(self):
        assert not store_locked(Store("sqlite:///:memory:"))


# --- the CLI ---


@pytest.fixture
def cli_db(store, monkeypatch, tmp_path):
    """CRYPTO_AGENT_DB_PATH pointing at the store fixture's file; no config file from the working dir."""
    monkeypatch.setenv("CRYPTO_AGENT_DB_PATH", str(store.path))
    monkeypatch.delenv("CRYPTO_AGENT_DATABASE_URL", raising=False)
    monkeypatch.delenv("CRYPTO_AGENT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return store


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli_main(["backtest", *args])
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


class TestCli:
    def test_json_output_is_the_engines_result(self, cli_db, capsys):
        code, out, _ = run_cli(capsys, "--symbol", "btcusdt", "--timeframe", "H4", "--strategy", "sma_cross",
                               "--param", "fast=10", "--json")
        assert code == 0
        report = json.loads(out)
        expected = bt.run_backtest(cli_db.candles("BTCUSDT", "4h"), "sma_cross", {"fast": 10}, periods_per_year=2190)
        assert report == {"symbol": "BTCUSDT", "timeframe": "4h", "strategy": "sma_cross",
                          "params": {"fast": 10, "slow": 50}, **json.loads(json.dumps(expected.to_dict()))}
        assert row_count(cli_db) == 0  # without --save nothing is written

    def test_human_output_lists_every_metric(self, cli_db, capsys):
        code, out, _ = run_cli(capsys, "--symbol", "BTCUSDT", "--strategy", "breakout", "--days", "30")
        assert code == 0
        r = bt.run_unit(cli_db, "BTCUSDT", "4h", "breakout", "ref", lookback_days=30)
        assert "BTCUSDT 4h breakout lookback=20" in out
        assert f"total_return  {r.total_return * 100:+.2f} %" in out
        assert f"max_drawdown  {r.max_drawdown * 100:+.2f} %" in out
        assert f"exposure      {r.exposure * 100:.2f} %" in out
        assert "180 candles, fee 10 bps" in out
        for word in ("sharpe", "win_rate", "trades"):
            assert word in out

    def test_save_writes_a_row_and_honours_the_lock(self, cli_db, capsys):
        code, out, _ = run_cli(capsys, "--symbol", "BTCUSDT", "--strategy", "rsi_reversion", "--save")
        assert code == 0 and "saved         run_id cli-" in out
        assert row_count(cli_db) == 1
        (cli_db.path.parent / "LOCKED").touch()
        code, _, err = run_cli(capsys, "--symbol", "BTCUSDT", "--strategy", "rsi_reversion", "--save")
        assert code == 1 and "locked" in err
        assert row_count(cli_db) == 1

    @pytest.mark.parametrize(("args", "text"), [
        (["--strategy", "macd"], "use one of: sma_cross, rsi_reversion, breakout"),
        (["--strategy", "sma_cross", "--param", "fats=3"], "valid parameters: fast=20 slow=50"),
        (["--strategy", "sma_cross", "--param", "fast"], "malformed --param"),
        (["--strategy", "sma_cross", "--param", "fast=60"], "1 <= fast < slow"),
        (["--strategy", "sma_cross", "--timeframe", "15m"], "unknown timeframe"),
        (["--strategy", "sma_cross", "--fee-bps", "-3"], "--fee-bps"),
    ])
    def test_bad_input_exits_2_with_the_valid_names(self, cli_db, capsys, args, text):
        code, out, err = run_cli(capsys, "--symbol", "BTCUSDT", *args)
        assert code == 2 and text in err and out == ""

    def test_too_little_data_exits_2_and_says_how_many_are_needed(self, cli_db, capsys):
        code, _, err = run_cli(capsys, "--symbol", "ETHUSDT", "--strategy", "sma_cross")
        assert code == 2 and "30 stored candles" in err and "at least 51" in err

    def test_a_missing_database_is_an_error_and_is_not_created(self, monkeypatch, tmp_path, capsys):
        missing = tmp_path / "nowhere" / "crypto_agent.db"
        monkeypatch.setenv("CRYPTO_AGENT_DB_PATH", str(missing))
        monkeypatch.delenv("CRYPTO_AGENT_CONFIG", raising=False)
        monkeypatch.chdir(tmp_path)
        code, _, err = run_cli(capsys, "--symbol", "BTCUSDT", "--strategy", "sma_cross")
        assert code == 1 and "no database" in err
        assert not missing.exists()

    def test_the_installed_command_runs(self, cli_db, tmp_path):
        exe = Path(sys.executable).parent / "crypto-agent"
        proc = subprocess.run(
            [str(exe), "backtest", "--symbol", "BTCUSDT", "--strategy", "nope"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
        )
        assert proc.returncode == 2 and "sma_cross, rsi_reversion, breakout" in proc.stderr
