"""The Binance client against the real simulator on 127.0.0.1: pagination, limits, faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from crypto_agent.exchange import (
    BinanceClient,
    ExchangeError,
    ExchangeUnreachable,
    InvalidSymbol,
    IPBanned,
    MalformedResponse,
    RateLimited,
)
from crypto_agent.settings import load_settings
from crypto_agent.simulator import Simulator

pytestmark = pytest.mark.timeout(120)

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


class RecordingSleep:
    """time.sleep that remembers how long it was asked to sleep, and can act before sleeping."""

    def __init__(self, before: Callable[[int], None] | None = None) -> None:
        self.calls: list[float] = []
        self.before = before

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.before is not None:
            self.before(len(self.calls))
        time.sleep(seconds)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A simulator of a few symbols, with Binance's default limits."""
    with Simulator(host="127.0.0.1", port=0, symbols=SYMBOLS, seed=0, history_days=200) as s:
        yield s


def kline_requests(sim: Simulator) -> int:
    return sim.stats()["requests"].get("/api/v3/klines", 0)


def statuses(sim: Simulator) -> dict[int, int]:
    return {int(code): n for code, n in sim.stats()["status"].items()}


def client_for(sim: Simulator, **kw) -> BinanceClient:
    kw.setdefault("timeout_s", 5)
    kw.setdefault("backoff_s", 0.01)
    return BinanceClient(sim.url, **kw)


class TestEndpoints:
    def test_ping_time_and_exchange_info_answer_like_binance(self, sim: Simulator) -> None:
        with client_for(sim) as client:
            client.ping()
            server_ms = client.server_time()
            assert abs(server_ms - time.time() * 1000) < 60_000
            assert client.trading_symbols() == set(SYMBOLS)
            one = client.exchange_info(["ETHUSDT"])
            assert [s["symbol"] for s in one["symbols"]] == ["ETHUSDT"]
            # the used weight is the exchange's own count: ping 1 + time 1 + exchangeInfo 20 + 20
            assert client.used_weight == sim.stats()["used_weight"] == 42

    def test_rate_limit_status_reads_the_exchanges_count(self, sim: Simulator) -> None:
        with client_for(sim, weight_limit=1000) as client:
            assert client.rate_limit_status(refresh=False).used_weight is None
            client.klines("BTCUSDT", "1h", limit=3)
            status = client.rate_limit_status()
        assert status.used_weight == sim.stats()["used_weight"] == 3  # klines 2 + ping 1
        assert status.used_share == 0.003 and status.banned_until is None

    def test_an_unknown_symbol_is_reported_by_name_and_not_retried(self, sim: Simulator) -> None:
        with client_for(sim) as client, pytest.raises(InvalidSymbol) as info:
            client.klines("FOOUSDT", "1h")
        assert info.value.symbol == "FOOUSDT"
        assert "FOOUSDT" in str(info.value) and "-1121" in str(info.value)
        assert kline_requests(sim) == 1

    def test_an_unknown_interval_is_a_4xx_error_with_the_binance_code_and_not_retried(self, sim: Simulator) -> None:
        with client_for(sim) as client, pytest.raises(ExchangeError) as info:
            client.klines("BTCUSDT", "7h")
        assert info.value.status == 400 and info.value.code == -1120
        assert kline_requests(sim) == 1

    def test_from_settings_takes_the_limits_and_the_url_from_the_settings(self, sim: Simulator) -> None:
        settings = load_settings(exchange_url=sim.url, weight_limit_per_minute=1234, weight_window_s=7.0)
        with BinanceClient.from_settings(settings) as client:
            assert client.base_url == sim.url
            assert client.weight_limit == 1234 and client.budget.window_s == 7.0
            client.ping()


class TestKlines:
    def test_100_days_of_1h_come_in_3_pages_without_gap_or_duplicate(self, sim: Simulator) -> None:
        with client_for(sim) as client:
            now = client.server_time()
            end = now // HOUR_MS * HOUR_MS
            start = end - 100 * DAY_MS
            candles = client.closed_klines("BTCUSDT", "1h", start, end, now_ms=now)
        open_times = [c[0] for c in candles]
        assert open_times == list(range(start, end, HOUR_MS))  # 2400 candles, each once, in order
        assert kline_requests(sim) == 3

    def test_pages_continue_past_a_hole_the_exchange_has(self, sim: Simulator) -> None:
        with client_for(sim) as client:
            now = client.server_time()
            end = now // HOUR_MS * HOUR_MS
            start = end - 100 * DAY_MS
            hole = (start + 990 * HOUR_MS, start + 1010 * HOUR_MS)  # across the first page's end
            sim.set_faults(gaps=[{"symbol": "BTCUSDT", "interval": "1h", "start_ms": hole[0], "end_ms": hole[1]}])
            candles = client.closed_klines("BTCUSDT", "1h", start, end, now_ms=now)
        expected = [t for t in range(start, end, HOUR_MS) if not hole[0] <= t < hole[1]]
        assert [c[0] for c in candles] == expected

    def test_only_closed_candles_are_returned(self, sim: Simulator) -> None:
        with client_for(sim) as client:
            now = client.server_time()
            raw = client.klines("ETHUSDT", "1h", start_ms=now - 5 * HOUR_MS)
            candles = client.closed_klines("ETHUSDT", "1h", now - 5 * HOUR_MS)
        # the exchange includes the candle still open, as Binance does; the client drops it
        assert raw[-1][6] >= now
        assert candles and all(c[6] < now for c in candles)
        assert candles[-1][0] == now // HOUR_MS * HOUR_MS - HOUR_MS
        assert [c[0] for c in candles] == [k[0] for k in raw[:-1]][-len(candles):]

    def test_the_end_is_exclusive_and_candles_are_stored_form(self, sim: Simulator) -> None:
        with client_for(sim) as client:
            now = client.server_time()
            end = now // (4 * HOUR_MS) * (4 * HOUR_MS) - 8 * HOUR_MS
            candles = client.closed_klines("SOLUSDT", "4h", end - 40 * HOUR_MS, end)
        assert [c[0] for c in candles] == list(range(end - 40 * HOUR_MS, end, 4 * HOUR_MS))
        o, h, low, c = candles[0][1:5]
        assert isinstance(o, float) and h >= max(o, c) and low <= min(o, c)


class TestRateLimit:
    @staticmethod
    def _load(client: BinanceClient) -> list[BaseException]:
        """4 threads x 16 klines requests (128 weight) on one client; the errors they met."""
        errors: list[BaseException] = []

        def fetch(symbol: str) -> None:
            try:
                for i in range(16):
                    client.klines(symbol, "1h", limit=10 + i)
            except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertion
                errors.append(exc)

        threads = [threading.Thread(target=fetch, args=(s,)) for s in SYMBOLS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return errors

    def test_a_small_limit_is_never_exceeded_and_the_work_still_finishes(self) -> None:
        # 40 weight per 1 s window on both sides: 128 weight needs several windows
        with Simulator(host="127.0.0.1", port=0, symbols=SYMBOLS, seed=0, history_days=30,
                       weight_limit=40, weight_window_s=1.0) as sim:
            with client_for(sim, weight_limit=40, weight_window_s=1.0) as client:
                assert self._load(client) == []
            assert kline_requests(sim) == 64
            assert 429 not in statuses(sim) and 418 not in statuses(sim)
            assert client.budget.waits > 0  # it did slow down to stay under the limit

    def test_the_simulator_does_enforce_the_limit_on_a_client_that_ignores_it(self) -> None:
        # The same load, with the client believing the limit is huge: the exchange answers 429.
        with Simulator(host="127.0.0.1", port=0, symbols=SYMBOLS, seed=0, history_days=30,
                       weight_limit=40, weight_window_s=1.0) as sim:
            with client_for(sim, weight_limit=1_000_000, weight_window_s=1.0) as client:
                self._load(client)
            assert statuses(sim).get(429, 0) >= 1

    def test_a_429_storm_waits_retry_after_then_succeeds(self, sim: Simulator) -> None:
        sim.set_faults(storm_429=3, retry_after_s=1)
        sleep = RecordingSleep()
        with client_for(sim, sleep=sleep) as client:
            klines = client.klines("BTCUSDT", "1h", limit=5)
        assert len(klines) == 5
        assert statuses(sim)[429] == 3
        assert sum(1 for s in sleep.calls if s >= 0.9) == 3  # waited Retry-After each time

    def test_a_retry_after_longer_than_allowed_is_raised_not_waited(self, sim: Simulator) -> None:
        sim.set_faults(storm_429=1, retry_after_s=300)
        sleep = RecordingSleep()
        with client_for(sim, sleep=sleep, max_retry_after_s=120) as client, pytest.raises(RateLimited) as info:
            client.klines("BTCUSDT", "1h", limit=5)
        assert "300" in str(info.value)
        assert sleep.calls == [] and kline_requests(sim) == 1

    def test_418_stops_at_once_says_until_when_and_sends_nothing_more(self, sim: Simulator) -> None:
        sim.set_faults(ban_418_s=600)
        sleep = RecordingSleep()
        with client_for(sim, sleep=sleep) as client:
            with pytest.raises(IPBanned) as info:
                client.klines("BTCUSDT", "1h", limit=5)
            sent = sum(sim.stats()["requests"].values())
            with pytest.raises(IPBanned):
                client.server_time()
            with pytest.raises(IPBanned):
                client.klines("ETHUSDT", "1h")
        assert sum(sim.stats()["requests"].values()) == sent == 1
        expected = datetime.now(UTC) + timedelta(seconds=600)
        assert abs((info.value.until - expected).total_seconds()) < 30
        assert "banned" in str(info.value) and info.value.until.strftime("%Y-%m-%d %H:%M") in str(info.value)
        assert "do not retry before" in str(info.value)
        assert sleep.calls == []


class TestRetries:
    def test_5xx_is_retried_with_backoff_then_succeeds(self, sim: Simulator) -> None:
        sim.go_down("503")
        sleep = RecordingSleep(before=lambda n: sim.clear_faults() if n == 2 else None)
        with client_for(sim, sleep=sleep, retries=4, backoff_s=0.05) as client:
            klines = client.klines("BTCUSDT", "1h", limit=3)
        assert len(klines) == 3
        assert statuses(sim)[503] == 2
        assert sleep.calls == [0.05, 0.1]  # exponential backoff

    def test_5xx_that_persists_fails_after_a_bounded_number_of_attempts(self, sim: Simulator) -> None:
        sim.go_down("503")
        with client_for(sim, retries=2) as client, pytest.raises(ExchangeError) as info:
            client.klines("BTCUSDT", "1h", limit=3)
        assert info.value.status == 503 and "after 3 attempts" in str(info.value)
        assert statuses(sim)[503] == 3

    def test_malformed_bodies_are_retried_then_succeed(self, sim: Simulator) -> None:
        sim.set_faults(malformed=2)
        with client_for(sim, retries=4) as client:
            klines = client.klines("BTCUSDT", "1h", limit=3)
        assert len(klines) == 3 and kline_requests(sim) == 3

    def test_malformed_bodies_that_persist_raise_malformed_response(self, sim: Simulator) -> None:
        sim.set_faults(malformed=10)
        with client_for(sim, retries=2) as client, pytest.raises(MalformedResponse) as info:
            client.klines("BTCUSDT", "1h", limit=3)
        assert "/api/v3/klines" in str(info.value)
        assert kline_requests(sim) == 3

    def test_a_slow_exchange_times_out_and_is_retried(self, sim: Simulator) -> None:
        sim.set_faults(slow_s=2.0)
        with client_for(sim, timeout_s=0.3, retries=1) as client:
            with pytest.raises(ExchangeUnreachable) as info:
                client.server_time()
            assert "timed out" in str(info.value) and "2 attempt" in str(info.value)
        sleep = RecordingSleep(before=lambda n: sim.clear_faults())
        with client_for(sim, timeout_s=0.3, retries=2, sleep=sleep) as client:
            assert client.server_time() > 0
        assert len(sleep.calls) == 1

    def test_a_refused_connection_is_exchange_unreachable_naming_the_url(self, sim: Simulator) -> None:
        sim.go_down("refuse")
        with client_for(sim, retries=2) as client:
            with pytest.raises(ExchangeUnreachable) as info:
                client.ping()
            assert sim.url in str(info.value) and "exchange_url" in str(info.value)
            sim.come_up()
            client.ping()
