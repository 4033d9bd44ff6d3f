"""The catalogue of faults (crypto_agent.faults) on real processes, real SQLite files and the real simulator on
127.0.0.1: each fault shows where the runbook's checks look, and clear() undoes what can be undone."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from crypto_agent import faults, process
from crypto_agent.errors import InputError
from crypto_agent.faults import FaultError
from crypto_agent.process import Liveness, ServiceNotRunning
from crypto_agent.service import read_heartbeat
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store, check_integrity

try:
    from service_kit import keeper, make_settings, seed_store, synthetic_candles, wait_until
except ImportError:  # tests/ became a package
    from tests.service_kit import keeper, make_settings, seed_store, synthetic_candles, wait_until  # noqa: F401

CALM = {"daemon_unit_pause_s": 0.5, "daemon_cycle_pause_s": 5.0}


@pytest.fixture
def filled(tmp_path: Path):
    """Settings of a tmp home whose store holds 150 fresh H1 candles of BTCUSDT and ETHUSDT."""
    settings = make_settings(tmp_path, **CALM)
    seed_store(settings)
    return settings


def daemon(settings) -> process.ServiceSpec:
    return process.service_spec("backtest", settings)


class TestServiceFaults:
    def test_sigkill_leaves_the_daemon_dead_and_a_second_kill_finds_nothing(self, filled, keeper) -> None:
        started = keeper.start(daemon(filled), filled)
        done = faults.kill(filled, "backtest")
        assert done.pid == started.pid and "SIGKILL" in done.what
        wait_until(lambda: not process.inspect(daemon(filled)).alive, 10, "the daemon dead")
        with pytest.raises(ServiceNotRunning):
            faults.kill(filled, "backtest", signal.SIGTERM)

    def test_hang_restarts_the_daemon_into_silence(self, filled, keeper) -> None:
        keeper.start(daemon(filled), filled)
        done = faults.hang(filled, after_steps=2)
        keeper.adopt(done.pid)
        assert faults.fault_of(filled) == "hang-after:2" and "hang-after:2" in done.what
        spec = daemon(filled)
        wait_until(lambda: (beat := read_heartbeat(spec.heartbeat)) is not None and beat.age_s() > 2.0, 30,
                   "the daemon's heartbeat to stop")
        assert psutil.Process(done.pid).is_running()  # alive, but silent

    def test_crash_after_kills_the_daemon_and_leaves_its_pidfile(self, filled, keeper) -> None:
        done = faults.crash_after(filled, steps=2)
        keeper.adopt(done.pid)
        spec = daemon(filled)
        wait_until(lambda: not process.inspect(spec).alive, 30, "the daemon to crash")
        assert spec.pidfile.exists()
        assert process.inspect(spec).state in (Liveness.NOT_RUNNING, Liveness.ZOMBIE)

    def test_grow_memory_grows_the_resident_set(self, filled, keeper) -> None:
        done = faults.grow_memory(filled, mb_per_s=100, max_mb=80)
        keeper.adopt(done.pid)
        assert faults.fault_of(filled) == "grow-memory:100"
        proc = psutil.Process(done.pid)
        first = proc.memory_info().rss
        wait_until(lambda: proc.memory_info().rss - first > 40 * 1024 * 1024, 30, "40 MB more resident memory")

    def test_burn_cpu_spins_a_core(self, filled, keeper) -> None:
        done = faults.burn_cpu(filled)
        keeper.adopt(done.pid)
        proc = psutil.Process(done.pid)
        proc.cpu_percent(None)
        time.sleep(1.0)
        assert proc.cpu_percent(None) > 30

    def test_clear_continues_a_stopped_daemon_and_restarts_a_faulty_one_clean(self, filled, keeper) -> None:
        faulty = faults.burn_cpu(filled)
        keeper.adopt(faulty.pid)
        faults.stop(filled, "backtest")
        wait_until(lambda: psutil.Process(faulty.pid).status() == psutil.STATUS_STOPPED, 10, "the daemon stopped")
        done = faults.clear(filled)
        keeper.adopt(process.inspect(daemon(filled)).pid)
        assert done[0] == "SIGCONT sent to the stopped backtest service"
        assert "restarted without the fault" in done[1] and len(done) == 2  # no local simulator: nothing else
        assert faults.fault_of(filled) is None
        assert process.inspect(daemon(filled)).pid != faulty.pid


class TestStoreFaults:
    def test_corrupt_pages_damages_as_many_pages_as_asked(self, filled) -> None:
        with Store(filled.database_url) as store:
            store.upsert_candles("SOLUSDT", "1h", synthetic_candles(3000, 0.0))
        done = faults.corrupt_pages(filled, pages=2)
        assert done.count == 2 and "2 pages" in done.what
        assert not check_integrity(filled.db_path).ok

    def test_a_table_of_one_page_is_damaged_too(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path)
        with Store(settings.database_url) as store:
            store.upsert_candles("BTCUSDT", "1h", synthetic_candles(3, 0.0))
        assert faults.corrupt_pages(settings).count == 1
        assert not check_integrity(settings.db_path).ok

    def test_a_truncated_file_fails_quick_check(self, filled) -> None:
        size = filled.db_path.stat().st_size
        done = faults.truncate_db(filled, keep=0.5)
        assert done.count and filled.db_path.stat().st_size < size
        assert not check_integrity(filled.db_path).ok

    def test_truncate_refuses_a_locked_store_and_a_bad_share(self, filled) -> None:
        with pytest.raises(InputError):
            faults.truncate_db(filled, keep=1.5)
        (filled.db_path.parent / "LOCKED").write_text("{}")
        with pytest.raises(FaultError) as err:
            faults.truncate_db(filled)
        assert "a recovery holds the store" in err.value.message
        assert check_integrity(filled.db_path).ok

    def test_delete_candles_takes_every_timeframe_of_the_settings(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path, timeframes=["1h", "4h"])
        now = time.time() // 3600 * 3600 + 600  # ten past the hour: 10.5 h back takes exactly 10 hourly candles
        with Store(settings.database_url) as store:
            for tf in ("1h", "4h"):
                store.upsert_candles("BTCUSDT", tf, synthetic_candles(50, 0.0, now_ms=int(now * 1000)))
                store.upsert_candles("ETHUSDT", tf, synthetic_candles(50, 0.0, now_ms=int(now * 1000)))
        done = faults.delete_candles(settings, ["BTCUSDT"], hours=10.5, now=now)
        assert done.count == 20 and "1h/4h" in done.what
        with Store(settings.database_url) as store:
            assert store.count("4h", "BTCUSDT") == 40 and store.count("4h", "ETHUSDT") == 50


class TestExchangeFaults:
    def test_each_mode_shows_on_the_simulator_and_clear_heals_it(self, tmp_path: Path) -> None:
        with Simulator(port=0) as sim:
            settings = make_settings(tmp_path, create_store=False, exchange_url=sim.url)
            ping = f"{sim.url}/api/v3/ping"
            faults.exchange(settings, "429", count=1, retry_after_s=2)
            throttled = httpx.get(ping, timeout=5)
            assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "2"
            assert httpx.get(ping, timeout=5).status_code == 200
            assert "418" in faults.exchange(settings, "418", for_s=30).what
            assert httpx.get(ping, timeout=5).status_code == 418
            faults.clear_exchange(settings)
            faults.exchange(settings, "malformed", count=1)
            body = httpx.get(f"{sim.url}/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h"}, timeout=5)
            assert body.status_code == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(body.text)
            faults.exchange(settings, "slow", seconds=0.5)
            faults.exchange(settings, "down")
            assert httpx.get(ping, timeout=5).status_code == 503
            assert faults.clear(settings) == [f"the exchange simulator serves again, without faults ({sim.url})"]
            assert httpx.get(ping, timeout=5).status_code == 200
            assert faults.SimulatorControl.of(settings).faults()["slow_s"] == 0

    def test_unknown_modes_and_a_refusal_without_an_end_are_input_errors(self, tmp_path: Path) -> None:
        with Simulator(port=0) as sim:
            settings = make_settings(tmp_path, create_store=False, exchange_url=sim.url)
            with pytest.raises(InputError):
                faults.exchange(settings, "meteor")
            with pytest.raises(InputError):
                faults.exchange(settings, "refuse")
            assert httpx.get(f"{sim.url}/api/v3/ping", timeout=5).status_code == 200
