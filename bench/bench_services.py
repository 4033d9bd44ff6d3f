"""The services' figures: the daemon's peak memory over a full cycle of 60 symbols x 2 years,
how long SIGTERM takes to end it, and what one health probe costs.

- Peak memory: a fresh store with 60 symbols x 2 years of H1 and H4 candles; the real daemon
  (`process.start`) runs one full cycle (360 units) with no pause; peak RSS is the kernel's VmHWM
  of the process, read just before it is stopped. Target: under 500 MB.
- Stop: SIGTERM sent in the middle of a cycle, to the daemon's exit, by `process.stop`. Target: 10 s.
- Probe: CPU time of this process per `health.probe` (psutil, heartbeat, log tail), the CPU
  sampling sleep excluded since it costs no CPU. Target: under 50 ms.

Run: python -m bench.bench_services [--symbols 60] [--days 730] [--probes 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from crypto_agent import health, process
from crypto_agent.backtest import STRATEGIES
from crypto_agent.settings import load_settings
from crypto_agent.store import Store
from crypto_agent.universe import TIMEFRAMES, UNIVERSE

PEAK_RSS_TARGET_MB = 500.0
STOP_TARGET_S = 10.0
PROBE_CPU_TARGET_MS = 50.0


def candles(n: int, interval_ms: int, seed: int, now_ms: int) -> list[tuple]:
    """n closed candles ending before now, a deterministic random walk per symbol."""
    last_open = now_ms // interval_ms * interval_ms - interval_ms
    out = []
    price = 50.0 + seed
    for i in range(n):
        t = last_open - (n - 1 - i) * interval_ms
        price *= 1.0 + ((i * 7919 + seed * 104729) % 201 - 100) / 10_000
        out.append((t, price, price * 1.01, price * 0.99, price * 1.001, 10.0, t + interval_ms - 1, price * 10, 100))
    return out


def seed(db_url: str, symbols: list[str], days: int) -> tuple[int, float]:
    """Fill the store; (rows written, seconds)."""
    now_ms = int(time.time() * 1000)
    started = time.perf_counter()
    rows = 0
    with Store(db_url) as store:
        for i, symbol in enumerate(symbols):
            for tf in ("1h", "4h"):
                ms = TIMEFRAMES[tf].ms
                rows += store.upsert_candles(symbol, tf, candles(days * 86_400_000 // ms, ms, i, now_ms))
    return rows, time.perf_counter() - started


def vm_hwm_mb(pid: int) -> float:
    """The kernel's peak resident set size of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for PID {pid}")


def log_has(path: Path, text: str) -> bool:
    """Whether the log contains text."""
    try:
        return text in path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=60)
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--probes", type=int, default=50)
    args = parser.parse_args(argv or [])
    symbols = list(UNIVERSE[: args.symbols])

    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        settings = load_settings(
            home=Path(tmp), symbols=symbols, timeframes=["1h", "4h"], daemon_unit_pause_s=0.0,
            daemon_cycle_pause_s=3600.0, daemon_lookback_days=args.days, heartbeat_interval_s=1.0,
            start_timeout_s=120.0,
        )
        rows, seconds = seed(settings.database_url, symbols, args.days)
        size_mb = settings.db_path.stat().st_size / 1e6
        print(f"store: {rows:,} candles ({len(symbols)} symbols x {args.days} days, H1+H4) "
              f"written in {seconds:.1f} s, {size_mb:.0f} MB")

        spec = process.service_spec("backtest", settings)
        units = len(symbols) * 2 * len(STRATEGIES)
        started = process.start(spec, settings)
        try:
            t0 = time.perf_counter()
            sampled_peak = 0.0
            proc = psutil.Process(started.pid)
            while not log_has(spec.log, "cycle 1 done"):
                sampled_peak = max(sampled_peak, proc.memory_info().rss / 2**20)
                if time.perf_counter() - t0 > 1800:
                    raise RuntimeError("the daemon did not finish a cycle in 30 min")
                time.sleep(0.2)
            cycle_s = time.perf_counter() - t0
            peak = vm_hwm_mb(started.pid)
            probe_costs = bench_probe(spec, settings, args.probes)
            fill_log(spec.log)
            busy_log_costs = bench_probe(spec, settings, args.probes)
        finally:
            stopped = process.stop(spec)
        print(f"daemon: one full cycle of {units} units in {cycle_s:.1f} s ({cycle_s / units * 1000:.0f} ms/unit)")
        verdict = "ok" if peak < PEAK_RSS_TARGET_MB else "OVER TARGET"
        print(f"daemon peak RSS (VmHWM): {peak:.0f} MB (sampled max {sampled_peak:.0f} MB); "
              f"target < {PEAK_RSS_TARGET_MB:.0f} MB: {verdict}")

        # SIGTERM in the middle of a cycle
        again = process.start(spec, settings)
        time.sleep(3.0)
        mid = process.stop(spec)
        verdict = "ok" if mid.signal == "SIGTERM" and mid.elapsed_s < STOP_TARGET_S else "OVER TARGET"
        print(f"stop mid-cycle: {mid.signal} -> exit {mid.exit_code} in {mid.elapsed_s:.2f} s "
              f"(idle stop after the cycle: {stopped.elapsed_s:.2f} s); target < {STOP_TARGET_S:.0f} s: {verdict}")
        del again

        cpu_ms, wall_ms = probe_costs
        verdict = "ok" if statistics.median(cpu_ms) < PROBE_CPU_TARGET_MS else "OVER TARGET"
        print(f"probe ({len(cpu_ms)} probes of a live daemon, CPU sample sleep excluded): CPU median "
              f"{statistics.median(cpu_ms):.2f} ms, max {max(cpu_ms):.2f} ms; wall median "
              f"{statistics.median(wall_ms):.2f} ms; target < {PROBE_CPU_TARGET_MS:.0f} ms CPU: {verdict}")
        cpu_ms, wall_ms = busy_log_costs
        verdict = "ok" if statistics.median(cpu_ms) < PROBE_CPU_TARGET_MS else "OVER TARGET"
        print(f"probe with a busy log (its 256 KB tail all from the last minute, 1 line in 10 an error): CPU "
              f"median {statistics.median(cpu_ms):.2f} ms, max {max(cpu_ms):.2f} ms; target < "
              f"{PROBE_CPU_TARGET_MS:.0f} ms CPU: {verdict}")


def fill_log(path: Path, n: int = 4000) -> None:
    """Append n recent, well-formed lines to a service log (1 in 10 an ERROR), as a noisy minute would."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    with open(path, "a", encoding="utf-8") as f:
        for i in range(n):
            level = "ERROR" if i % 10 == 0 else "INFO"
            f.write(f"{stamp}.000Z {level} crypto_agent.bench[1]: synthetic line {i} of a busy minute, padded\n")


def bench_probe(spec: process.ServiceSpec, settings, n: int) -> tuple[list[float], list[float]]:
    """CPU and wall milliseconds of n probes, each with a 0.05 s CPU sample (its sleep subtracted)."""
    sample_s = 0.05
    health.probe(spec, settings, cpu_sample_s=sample_s)  # warm: imports, first psutil calls
    cpu_ms, wall_ms = [], []
    for _ in range(n):
        c0, w0 = time.process_time(), time.perf_counter()
        report = health.probe(spec, settings, cpu_sample_s=sample_s)
        cpu_ms.append((time.process_time() - c0) * 1000)
        wall_ms.append((time.perf_counter() - w0 - sample_s) * 1000)
        assert report.alive, report.summary
    return cpu_ms, wall_ms


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
