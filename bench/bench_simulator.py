"""Benchmark: the simulator's candle generation and HTTP throughput.

Targets: 1000 candles of 1h computed in a few ms once their days are cached (tens of ms the first
time), a 1000-candle klines request over HTTP in under 10 ms warm. Run: `python -m bench.bench_simulator`.
"""

from __future__ import annotations

import threading
import time

import httpx

from crypto_agent.simulator import Simulator

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def _generation(sim: Simulator) -> None:
    """Cold (first request for those days) and warm times of sim.klines, per interval."""
    for interval, limit in (("1m", 1000), ("1h", 1000), ("4h", 1000), ("1d", 1000)):
        cold, warm = [], []
        for symbol in SYMBOLS:
            started = time.perf_counter()
            rows = sim.klines(symbol, interval, limit=limit)
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            sim.klines(symbol, interval, limit=limit)
            warm.append(time.perf_counter() - started)
        print(f"klines {interval:>3} x {len(rows):4d}: cold {_ms(sum(cold) / len(cold))}, "
              f"warm {_ms(sum(warm) / len(warm))} (mean of {len(SYMBOLS)} symbols, formatting included)")


def _http(sim: Simulator) -> None:
    """Latency of ping and of a warm 1000-candle klines request, and throughput with 4 clients."""
    with httpx.Client(base_url=sim.url, timeout=10) as client:
        client.get("/api/v3/ping")
        n = 200
        started = time.perf_counter()
        for _ in range(n):
            client.get("/api/v3/ping")
        print(f"ping over HTTP (keep-alive): {_ms((time.perf_counter() - started) / n)} per request")
        params = {"symbol": "BTCUSDT", "interval": "1h", "limit": 1000}
        client.get("/api/v3/klines", params=params)
        n = 50
        started = time.perf_counter()
        for _ in range(n):
            client.get("/api/v3/klines", params=params)
        print(f"klines 1h x 1000 over HTTP, warm: {_ms((time.perf_counter() - started) / n)} per request")

    per_client = 100
    done = []

    def worker() -> None:
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            for k in range(per_client):
                c.get("/api/v3/klines", params={"symbol": SYMBOLS[k % len(SYMBOLS)], "interval": "1h", "limit": 100})
        done.append(per_client)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.perf_counter() - started
    print(f"4 clients, klines 1h x 100: {sum(done) / elapsed:7.0f} requests/s")


def main() -> None:
    """Print the figures."""
    with Simulator(port=0, history_days=800, weight_limit=10**9) as sim:
        _generation(sim)
        _http(sim)


if __name__ == "__main__":
    main()
