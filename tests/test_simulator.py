"""The bundled exchange simulator: Binance shapes, candles, faults, weight limits, CLI, Fear & Greed, FRED."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.simulator import Simulator

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
TIMEOUT = httpx.Timeout(10.0)


class SteppedClock:
    """A wall clock the test moves by hand (time is the one thing tests may fake)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(port=0, history_days=120) as s:
        yield s


@pytest.fixture
def client(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=TIMEOUT) as c:
        yield c


def klines(c: httpx.Client, **params: object) -> list[list]:
    r = c.get("/api/v3/klines", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def past_hour(hours_ago: int) -> int:
    return (int(time.time() * 1000) // HOUR_MS - hours_ago) * HOUR_MS


# --- Binance shapes -------------------------------------------------------------------------------


class TestBinanceEndpoints:
    def test_ping_and_time_answer_like_binance(self, client: httpx.Client) -> None:
        assert client.get("/api/v3/ping").json() == {}
        before = int(time.time() * 1000)
        server_time = client.get("/api/v3/time").json()["serverTime"]
        assert isinstance(server_time, int) and abs(server_time - before) < 60_000

    def test_exchange_info_lists_symbols_with_filters_and_the_weight_limit(self, client: httpx.Client) -> None:
        info = client.get("/api/v3/exchangeInfo").json()
        assert info["timezone"] == "UTC"
        assert len(info["symbols"]) == 60
        weight = next(r for r in info["rateLimits"] if r["rateLimitType"] == "REQUEST_WEIGHT")
        assert weight == {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000}
        one = client.get("/api/v3/exchangeInfo", params={"symbol": "ETHUSDT"}).json()["symbols"]
        assert [s["symbol"] for s in one] == ["ETHUSDT"]
        assert one[0]["status"] == "TRADING" and one[0]["baseAsset"] == "ETH" and one[0]["quoteAsset"] == "USDT"
        assert {f["filterType"] for f in one[0]["filters"]} >= {"PRICE_FILTER", "LOT_SIZE"}
        two = client.get("/api/v3/exchangeInfo", params={"symbols": '["BTCUSDT","SOLUSDT"]'}).json()["symbols"]
        assert [s["symbol"] for s in two] == ["BTCUSDT", "SOLUSDT"]

    def test_kline_rows_have_binance_types_and_a_consistent_candle(self, client: httpx.Client) -> None:
        rows = klines(client, symbol="BTCUSDT", interval="1h", limit=50)
        assert len(rows) == 50
        for row in rows:
            assert len(row) == 12
            assert isinstance(row[0], int) and isinstance(row[6], int) and isinstance(row[8], int)
            assert all(isinstance(row[i], str) for i in (1, 2, 3, 4, 5, 7, 9, 10, 11))
            assert row[6] == row[0] + HOUR_MS - 1
            o, h, low, c = (float(x) for x in row[1:5])
            assert h >= max(o, c) and low <= min(o, c) and low > 0
            assert float(row[5]) > 0 and float(row[7]) > 0 and row[8] > 0
            assert 0 <= float(row[9]) <= float(row[5])

    def test_newest_candle_is_the_one_still_open(self, client: httpx.Client) -> None:
        before = int(time.time() * 1000)
        newest = klines(client, symbol="ETHUSDT", interval="1h", limit=2)[-1]
        after = int(time.time() * 1000)
        assert newest[0] in (before // HOUR_MS * HOUR_MS, after // HOUR_MS * HOUR_MS)
        assert newest[6] >= before

    @pytest.mark.parametrize(
        ("params", "code"),
        [
            ({"interval": "1h"}, -1102),
            ({"symbol": "BTCUSDT"}, -1102),
            ({"symbol": "btcusdt", "interval": "1h"}, -1100),
            ({"symbol": "NOPEUSDT", "interval": "1h"}, -1121),
            ({"symbol": "BTCUSDT", "interval": "7h"}, -1120),
            ({"symbol": "BTCUSDT", "interval": "1h", "startTime": "yesterday"}, -1100),
            ({"symbol": "BTCUSDT", "interval": "1h", "limit": "0"}, -1130),
            ({"symbol": "BTCUSDT", "interval": "1h", "startTime": "2000", "endTime": "1000"}, -1023),
        ],
    )
    def test_bad_parameters_get_binance_error_codes(self, client: httpx.Client, params: dict, code: int) -> None:
        r = client.get("/api/v3/klines", params=params)
        assert r.status_code == 400
        assert r.json()["code"] == code and r.json()["msg"]
        assert "x-mbx-used-weight-1m" in r.headers

    def test_unknown_symbol_in_exchange_info_is_invalid(self, client: httpx.Client) -> None:
        r = client.get("/api/v3/exchangeInfo", params={"symbol": "NOPEUSDT"})
        assert r.status_code == 400 and r.json() == {"code": -1121, "msg": "Invalid symbol."}

    def test_unknown_paths_are_404(self, client: httpx.Client, sim: Simulator) -> None:
        assert client.get("/api/v3/nothing").status_code == 404
        assert client.get("/somewhere").status_code == 404
        stats = sim.stats()
        assert stats["requests"]["/api/v3/nothing"] == 1 and stats["status"][404] == 2

    def test_limit_is_capped_at_1000(self, client: httpx.Client) -> None:
        assert len(klines(client, symbol="BTCUSDT", interval="1m", limit=5000)) == 1000


# --- candles --------------------------------------------------------------------------------------


class TestCandles:
    def test_same_seed_same_candles_other_seed_other_candles(self) -> None:
        start = past_hour(300)
        with Simulator(port=0, seed=7) as a, Simulator(port=0, seed=7) as b, Simulator(port=0, seed=8) as c:
            got = [
                httpx.get(f"{s.url}/api/v3/klines", params={"symbol": "SOLUSDT", "interval": "1h",
                                                            "startTime": start, "limit": 200}, timeout=TIMEOUT).json()
                for s in (a, b, c)
            ]
        assert got[0] == got[1]
        assert len(got[0]) == 200
        assert [r[4] for r in got[0]] != [r[4] for r in got[2]]

    def test_each_symbol_has_its_own_price_scale_and_volatility(self) -> None:
        def daily(symbol: str) -> tuple[float, float]:
            rows = httpx.get(f"{s.url}/api/v3/klines", params={"symbol": symbol, "interval": "1d", "limit": 1000},
                             timeout=TIMEOUT).json()
            assert len(rows) == 801
            closes = [float(r[4]) for r in rows[:-1]]
            returns = [math.log(b / a) for a, b in itertools.pairwise(closes)]
            mean = sum(returns) / len(returns)
            return closes[-1], math.sqrt(sum((x - mean) ** 2 for x in returns) / len(returns))

        with Simulator(port=0, history_days=800) as s:
            btc_price, btc_vol = daily("BTCUSDT")
            xrp_price, _ = daily("XRPUSDT")
            sol_price, sol_vol = daily("SOLUSDT")
        assert btc_price > 1000 * xrp_price
        assert 10 < sol_price < btc_price
        assert sol_vol > 1.2 * btc_vol

    def test_history_starts_history_days_ago(self) -> None:
        with Simulator(port=0, history_days=30) as s:
            rows = httpx.get(f"{s.url}/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1d", "startTime": 0},
                             timeout=TIMEOUT).json()
        today = int(time.time() * 1000) // DAY_MS
        assert rows[0][0] == (today - 30) * DAY_MS
        assert len(rows) == 31

    def test_pages_by_start_time_have_no_gaps_nor_duplicates(self, client: httpx.Client) -> None:
        start = past_hour(24 * 100 + 5)
        seen: list[int] = []
        cursor = start
        for _ in range(10):
            page = klines(client, symbol="ETHUSDT", interval="1h", startTime=cursor, limit=1000)
            if not page:
                break
            seen += [r[0] for r in page]
            cursor = page[-1][0] + 1
        assert len(seen) > 2000  # more than two full pages
        assert seen[0] == start
        assert all(b - a == HOUR_MS for a, b in itertools.pairwise(seen))
        assert seen[-1] == int(time.time() * 1000) // HOUR_MS * HOUR_MS or seen[-1] == past_hour(1)

    def test_end_time_alone_gives_the_newest_candles_up_to_it(self, client: httpx.Client) -> None:
        end = past_hour(48) + 1234
        rows = klines(client, symbol="BTCUSDT", interval="1h", endTime=end, limit=10)
        assert [r[0] for r in rows] == [past_hour(48) - k * HOUR_MS for k in range(9, -1, -1)]

    def test_a_4h_candle_aggregates_its_four_1h_candles(self, client: httpx.Client) -> None:
        start = (int(time.time() * 1000) // (4 * HOUR_MS) - 30) * 4 * HOUR_MS
        fours = klines(client, symbol="AVAXUSDT", interval="4h", startTime=start, limit=30)
        ones = klines(client, symbol="AVAXUSDT", interval="1h", startTime=start, limit=120)
        assert len(fours) == 30 and len(ones) == 120
        for k, four in enumerate(fours):
            part = ones[4 * k:4 * k + 4]
            assert four[0] == part[0][0] and four[6] == part[-1][6]
            assert four[1] == part[0][1] and four[4] == part[-1][4]
            assert float(four[2]) == max(float(p[2]) for p in part)
            assert float(four[3]) == min(float(p[3]) for p in part)
            assert float(four[5]) == pytest.approx(sum(float(p[5]) for p in part), rel=1e-9)
            assert four[8] == sum(p[8] for p in part)

    def test_an_hour_aggregates_its_minutes(self, client: httpx.Client) -> None:
        start = past_hour(5)
        hour = klines(client, symbol="DOGEUSDT", interval="1h", startTime=start, limit=1)[0]
        minutes = klines(client, symbol="DOGEUSDT", interval="1m", startTime=start, limit=60)
        assert hour[1] == minutes[0][1] and hour[4] == minutes[-1][4]
        assert float(hour[2]) == max(float(m[2]) for m in minutes)
        assert hour[8] == sum(m[8] for m in minutes)

    def test_in_process_klines_equal_the_endpoint(self, sim: Simulator, client: httpx.Client) -> None:
        start = past_hour(100)
        assert sim.klines("BTCUSDT", "1h", start_time=start, limit=20) == klines(
            client, symbol="BTCUSDT", interval="1h", startTime=start, limit=20
        )


# --- faults ---------------------------------------------------------------------------------------


class TestFaults:
    def test_down_503_and_back(self, sim: Simulator, client: httpx.Client) -> None:
        sim.go_down("503")
        r = client.get("/api/v3/time")
        assert r.status_code == 503
        assert client.get("/fng/").status_code == 503
        sim.come_up()
        assert client.get("/api/v3/time").status_code == 200

    def test_go_down_refuses_connections_even_kept_alive_ones(self, sim: Simulator, client: httpx.Client) -> None:
        assert client.get("/api/v3/ping").status_code == 200  # a pooled, kept-alive connection
        sim.go_down("refuse")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sim.port), timeout=5)
        with pytest.raises(httpx.TransportError):
            client.get("/api/v3/ping")
        sim.come_up()
        assert client.get("/api/v3/ping").status_code == 200

    def test_slow_responses_time_out_a_hasty_client(self, sim: Simulator, client: httpx.Client) -> None:
        sim.set_faults(slow_s=1.5)
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{sim.url}/api/v3/ping", timeout=0.2)
        sim.clear_faults()
        assert client.get("/api/v3/ping").status_code == 200

    def test_storm_429_answers_the_next_n_requests_with_retry_after(self, sim: Simulator, client: httpx.Client) -> None:
        sim.set_faults(storm_429=2, retry_after_s=7)
        for _ in range(2):
            r = client.get("/api/v3/time")
            assert r.status_code == 429 and r.headers["Retry-After"] == "7" and r.json()["code"] == -1003
        assert client.get("/api/v3/time").status_code == 200

    def test_ban_418_until_cleared(self, sim: Simulator, client: httpx.Client) -> None:
        sim.set_faults(ban_418_s=30)
        r = client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h"})
        assert r.status_code == 418 and r.json()["code"] == -1003
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        assert 0 < sim.faults()["ban_418_s"] <= 30
        sim.clear_faults()
        assert client.get("/api/v3/ping").status_code == 200

    def test_malformed_klines_bodies(self, sim: Simulator, client: httpx.Client) -> None:
        sim.set_faults(malformed=1)
        assert client.get("/api/v3/ping").json() == {}  # other endpoints are not touched
        r = client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "limit": 10})
        assert r.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.content)
        assert len(klines(client, symbol="BTCUSDT", interval="1h", limit=10)) == 10

    def test_gaps_remove_candles_for_chosen_symbols_and_intervals(self, sim: Simulator, client: httpx.Client) -> None:
        start = past_hour(60)
        gap = {"symbol": "BTCUSDT", "interval": "1h", "start_ms": start + 10 * HOUR_MS, "end_ms": start + 15 * HOUR_MS}
        sim.set_faults(gaps=[gap])
        btc = [r[0] for r in klines(client, symbol="BTCUSDT", interval="1h", startTime=start, limit=20)]
        assert len(btc) == 20  # the limit is filled from after the gap
        assert not any(gap["start_ms"] <= t < gap["end_ms"] for t in btc)
        assert btc[10] == start + 15 * HOUR_MS
        eth = [r[0] for r in klines(client, symbol="ETHUSDT", interval="1h", startTime=start, limit=20)]
        assert eth == [start + k * HOUR_MS for k in range(20)]
        four = klines(client, symbol="BTCUSDT", interval="4h", startTime=start - start % (4 * HOUR_MS), limit=6)
        assert len(four) == 6 and all(b[0] - a[0] == 4 * HOUR_MS for a, b in itertools.pairwise(four))
        sim.set_faults(gaps=[{**gap, "symbol": None, "interval": None}])
        eth = [r[0] for r in klines(client, symbol="ETHUSDT", interval="1h", startTime=start, limit=20)]
        assert start + 10 * HOUR_MS not in eth

    def test_bad_fault_settings_are_refused_and_change_nothing(self, sim: Simulator) -> None:
        with pytest.raises(InputError, match="unknown fault"):
            sim.set_faults(slow=1)
        with pytest.raises(InputError, match="storm_429"):
            sim.set_faults(slow_s=2, storm_429=-1)
        with pytest.raises(InputError, match="end_ms"):
            sim.set_faults(gaps=[{"start_ms": 10, "end_ms": 5}])
        assert sim.faults()["slow_s"] == 0 and sim.faults()["gaps"] == []


class TestFaultsOverHttp:
    def test_post_get_delete_faults_and_stats(self, sim: Simulator, client: httpx.Client) -> None:
        r = client.post("/_sim/faults", json={"storm_429": 1, "retry_after_s": 3})
        assert r.status_code == 200 and r.json()["storm_429"] == 1
        assert client.get("/api/v3/ping").status_code == 429
        assert client.get("/_sim/faults").json()["storm_429"] == 0
        client.post("/_sim/faults", json={"down": "503"})
        assert client.get("/api/v3/ping").status_code == 503
        assert client.delete("/_sim/faults").json()["down"] is None
        assert client.get("/api/v3/ping").status_code == 200
        bad = client.post("/_sim/faults", json={"nonsense": 1})
        assert bad.status_code == 400 and "unknown fault" in bad.json()["error"]
        stats = client.get("/_sim/stats").json()
        assert stats["requests"]["/api/v3/ping"] == 3
        assert stats["status"] == {"429": 1, "503": 1, "200": 1}
        assert stats["used_weight"] == 1  # only the admitted ping was charged

    def test_down_refuse_over_http_comes_back_by_itself(self, sim: Simulator, client: httpx.Client) -> None:
        assert client.post("/_sim/down", json={"mode": "refuse", "for_s": 1.0}).status_code == 200
        refused = False
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", sim.port), timeout=2).close()
            except ConnectionRefusedError:
                refused = True
                break
            except ConnectionResetError:
                pass  # caught in the backlog as the port closed; the next try is refused
            time.sleep(0.02)
        assert refused
        for _ in range(100):
            try:
                if httpx.get(f"{sim.url}/api/v3/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            pytest.fail("the simulator did not come back up")


# --- weight limits --------------------------------------------------------------------------------


class TestWeightLimit:
    def test_over_the_limit_429_then_418_and_the_weight_header_rises(self) -> None:
        clock = SteppedClock(1_800_000_000.0)  # the start of a 60 s window
        with Simulator(port=0, weight_limit=10, clock=clock) as s, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
            used = [int(c.get("/api/v3/ping").headers["X-MBX-USED-WEIGHT-1M"]) for _ in range(10)]
            assert used == list(range(1, 11))
            clock.t += 20
            for _ in range(3):
                r = c.get("/api/v3/ping")
                assert r.status_code == 429 and r.json()["code"] == -1003
                assert r.headers["Retry-After"] == "40"  # seconds to the next window
            r = c.get("/api/v3/ping")
            assert r.status_code == 418 and r.headers["Retry-After"] == "120"
            clock.t += 60  # a new window, but still banned
            r = c.get("/api/v3/ping")
            assert r.status_code == 418 and r.headers["Retry-After"] == "60"
            clock.t += 61
            r = c.get("/api/v3/ping")
            assert r.status_code == 200 and r.headers["X-MBX-USED-WEIGHT-1M"] == "1"

    def test_weights_are_binances(self) -> None:
        clock = SteppedClock(1_800_000_000.0)
        with Simulator(port=0, clock=clock) as s, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
            headers = [
                c.get(path, params=params).headers["X-MBX-USED-WEIGHT"]
                for path, params in [
                    ("/api/v3/ping", {}),
                    ("/api/v3/time", {}),
                    ("/api/v3/exchangeInfo", {}),
                    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "limit": 1}),
                ]
            ]
            assert headers == ["1", "2", "22", "24"]
            assert s.stats()["used_weight"] == 24

    def test_limit_holds_under_concurrent_clients(self) -> None:
        clock = SteppedClock(1_800_000_000.0)
        statuses: list[int] = []
        lock = threading.Lock()
        with Simulator(port=0, weight_limit=100, clock=clock) as s:
            def hammer() -> None:
                with httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
                    got = [c.get("/api/v3/ping").status_code for _ in range(30)]
                with lock:
                    statuses.extend(got)

            threads = [threading.Thread(target=hammer) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
        assert statuses.count(200) == 100
        assert statuses.count(429) == 3
        assert statuses.count(418) == 180 - 103

    def test_a_client_ignoring_the_limit_on_the_real_clock_gets_429_then_418(self) -> None:
        with Simulator(port=0, weight_limit=20, weight_window_s=5.0) as s, \
                httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
            statuses, used = [], []
            for _ in range(300):
                r = c.get("/api/v3/ping")
                statuses.append(r.status_code)
                used.append(int(r.headers["X-MBX-USED-WEIGHT-1M"]))
                if r.status_code == 418:
                    break
        assert statuses[-1] == 418
        assert 429 in statuses and statuses.index(429) < statuses.index(418)
        assert max(used) == 20 and used[0] < used[1]


# --- a Binance client written by others -----------------------------------------------------------


class TestThirdPartyClient:
    def test_binance_connector_works_unchanged(self, sim: Simulator) -> None:
        from binance.error import ClientError
        from binance.spot import Spot

        spot = Spot(base_url=sim.url, timeout=10)
        rows = spot.klines("BTCUSDT", "1h", limit=5)
        assert len(rows) == 5 and len(rows[0]) == 12
        assert isinstance(spot.time()["serverTime"], int)
        info = spot.exchange_info(symbol="BTCUSDT")
        assert info["symbols"][0]["symbol"] == "BTCUSDT"
        assert len(spot.exchange_info(symbols=["BTCUSDT", "ETHUSDT"])["symbols"]) == 2
        with pytest.raises(ClientError) as err:
            spot.klines("NOPEUSDT", "1h")
        assert err.value.status_code == 400 and err.value.error_code == -1121
        sim.set_faults(storm_429=1)
        with pytest.raises(ClientError) as err:
            spot.time()
        assert err.value.status_code == 429 and err.value.header["Retry-After"] == "1"
        limited = Spot(base_url=sim.url, timeout=10, show_limit_usage=True).ping()
        assert int(limited["limit_usage"]["x-mbx-used-weight-1m"]) > 0


# --- the command ----------------------------------------------------------------------------------


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("crypto-agent")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from crypto_agent.cli import main; main()"]


class TestCommand:
    def test_serves_until_sigterm_and_exits_0(self) -> None:
        proc = subprocess.Popen(
            [*_cli(), "simulator", "--host", "127.0.0.1", "--port", "0", "--history-days", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout=60)
            assert lines and lines[0].startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() else lines
            url = lines[0].strip()
            assert httpx.get(f"{url}/api/v3/time", timeout=TIMEOUT).json()["serverTime"] > 0
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert proc.returncode == 0, err
        assert "simulator stopped" in out

    def test_a_port_in_use_is_a_clear_error_and_exit_1(self, sim: Simulator) -> None:
        result = subprocess.run(
            [*_cli(), "simulator", "--port", str(sim.port)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 1
        assert f"port {sim.port} on 127.0.0.1 is already in use" in result.stderr

    def test_starting_on_a_taken_port_in_process_raises(self, sim: Simulator) -> None:
        with pytest.raises(CryptoAgentError, match="already in use"):
            Simulator(port=sim.port).start()

    def test_bad_settings_are_input_errors(self) -> None:
        with pytest.raises(InputError):
            Simulator(weight_limit=0)
        with pytest.raises(InputError):
            Simulator(history_days=100_000)
        with pytest.raises(InputError):
            Simulator(symbols=["btc usdt"])


# --- Fear & Greed ---------------------------------------------------------------------------------


class TestFearGreed:
    def test_shape_newest_first_one_per_day(self, client: httpx.Client) -> None:
        body = client.get("/fng/", params={"limit": 10, "format": "json"}).json()
        assert body["name"] == "Fear and Greed Index" and body["metadata"] == {"error": None}
        data = body["data"]
        assert len(data) == 10
        today = int(time.time()) // 86400 * 86400
        assert [int(d["timestamp"]) for d in data] == [today - k * 86400 for k in range(10)]
        assert 0 < int(data[0]["time_until_update"]) <= 86400
        for d in data:
            value = int(d["value"])
            assert 0 <= value <= 100
            expected = ("Extreme Fear" if value <= 24 else "Fear" if value <= 46 else "Neutral" if value <= 54
                        else "Greed" if value <= 75 else "Extreme Greed")
            assert d["value_classification"] == expected
        assert len({d["value"] for d in data}) > 1

    def test_deterministic_per_day_and_seed(self, sim: Simulator, client: httpx.Client) -> None:
        with Simulator(port=0, history_days=120) as twin:
            other = httpx.get(f"{twin.url}/fng/?limit=30", timeout=TIMEOUT).json()
        assert client.get("/fng/?limit=30").json()["data"][1:] == other["data"][1:]

    def test_limit_0_is_the_whole_history(self, client: httpx.Client) -> None:
        data = client.get("/fng/", params={"limit": 0}).json()["data"]
        assert data[-1]["timestamp"] == str(int(dt.datetime(2018, 2, 1, tzinfo=dt.UTC).timestamp()))
        assert len(data) == (int(time.time()) // 86400) - 17563 + 1


# --- FRED -----------------------------------------------------------------------------------------


class TestFred:
    PATH = "/fred/series/observations"

    def test_daily_series_shape_weekends_and_holidays(self, client: httpx.Client) -> None:
        body = client.get(self.PATH, params={
            "series_id": "DGS10", "api_key": "abc", "file_type": "json",
            "observation_start": "2024-12-20", "observation_end": "2025-01-03",
        }).json()
        assert body["units"] == "lin" and body["observation_start"] == "2024-12-20"
        assert body["count"] == len(body["observations"]) == 11
        by_date = {o["date"]: o["value"] for o in body["observations"]}
        assert "2024-12-21" not in by_date and "2024-12-22" not in by_date  # a weekend
        assert by_date["2024-12-25"] == "." and by_date["2025-01-01"] == "."
        assert 0.5 <= float(by_date["2024-12-20"]) < 10
        assert set(body["observations"][0]) == {"realtime_start", "realtime_end", "date", "value"}

    @pytest.mark.parametrize("series_id", ["DGS10", "DFF", "CPIAUCSL", "M2SL", "DTWEXBGS", "VIXCLS", "T10Y2Y"])
    def test_every_series_has_recent_observations(self, client: httpx.Client, series_id: str) -> None:
        body = client.get(self.PATH, params={"series_id": series_id, "api_key": "k", "file_type": "json",
                                             "sort_order": "desc", "limit": 5}).json()
        assert body["count"] > 100 and len(body["observations"]) == 5
        newest = dt.date.fromisoformat(body["observations"][0]["date"])
        assert (dt.datetime.now(dt.UTC).date() - newest).days < 80
        if series_id in ("CPIAUCSL", "M2SL"):
            assert all(o["date"].endswith("-01") for o in body["observations"])

    def test_api_key_and_series_errors(self, client: httpx.Client) -> None:
        r = client.get(self.PATH, params={"series_id": "DGS10", "file_type": "json"})
        assert r.status_code == 400
        assert r.json() == {"error_code": 400, "error_message": "Bad Request.  Variable api_key has not been set."}
        r = client.get(self.PATH, params={"series_id": "NOPE", "api_key": "k", "file_type": "json"})
        assert r.status_code == 400
        assert r.json() == {"error_code": 400, "error_message": "Bad Request.  The series does not exist."}
        r = client.get(self.PATH, params={"series_id": "DGS10", "api_key": "k", "file_type": "json",
                                          "observation_start": "2025-02-01", "observation_end": "2025-01-01"})
        assert r.status_code == 400

    def test_a_registered_key_is_required_when_configured(self) -> None:
        with Simulator(port=0, history_days=10, fred_api_key="s3cret") as s:
            wrong = httpx.get(f"{s.url}{self.PATH}", params={"series_id": "DFF", "api_key": "other",
                                                             "file_type": "json"}, timeout=TIMEOUT)
            right = httpx.get(f"{s.url}{self.PATH}", params={"series_id": "DFF", "api_key": "s3cret",
                                                             "file_type": "json"}, timeout=TIMEOUT)
        assert wrong.status_code == 400
        message = wrong.json()["error_message"]
        assert message.startswith("Bad Request.  The value for variable api_key is not registered")
        assert right.status_code == 200 and right.json()["count"] > 0

    def test_xml_by_default_like_fred(self, client: httpx.Client) -> None:
        r = client.get(self.PATH, params={"series_id": "VIXCLS", "api_key": "k", "limit": 3})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/xml")
        assert r.text.count("<observation ") == 3
