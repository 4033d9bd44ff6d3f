"""The chaos drills' injections (crypto_agent.faults) and checks (crypto_agent.chaos) on real files, processes and a
real simulator: each fault really shows where the runbook's checks look, and nothing is done to what is not ours."""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
import pytest

from crypto_agent import backup, chaos, faults, holds, incidents, process, storelock
from crypto_agent.chaos import DrillResult
from crypto_agent.errors import ConfigError, InputError
from crypto_agent.faults import FaultError
from crypto_agent.process import NotOurProcess
from crypto_agent.quality import check_data
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store, check_integrity

try:
    from service_kit import keeper, make_settings, seed_store, wait_until
except ImportError:  # tests/ became a package
    from tests.service_kit import keeper, make_settings, seed_store, wait_until  # noqa: F401 (a fixture)

# The services run slowly here: verify() must find them HEALTHY, not busy.
CALM = {"daemon_unit_pause_s": 0.5, "daemon_cycle_pause_s": 5.0}


def count(settings, symbol: str) -> int:
    with Store(settings.database_url) as store:
        return store.count("1h", symbol)


@pytest.fixture
def filled(tmp_path: Path):
    """Settings of a tmp home whose store holds 150 fresh H1 candles of BTCUSDT and ETHUSDT."""
    settings = make_settings(tmp_path, **CALM)
    seed_store(settings)
    return settings


class TestDrills:
    def test_the_seven_drills_rehearse_the_five_runbook_scenarios_with_their_etas(self) -> None:
        assert list(chaos.DRILLS) == ["daemon-killed", "daemon-hung", "cpu-spike", "exchange-down", "data-gap",
                                      "db-corrupt", "crash-loop"]
        etas = {d.runbook: d.eta_min for d in chaos.DRILLS.values()}
        assert etas == {1: 2, 2: 15, 3: 30, 4: 5, 5: 60}

    def test_an_unknown_drill_is_an_input_error_naming_them_all(self) -> None:
        with pytest.raises(InputError) as err:
            chaos.drill("meteor-strike")
        assert "daemon-killed" in err.value.hint and "crash-loop" in err.value.hint


class TestStoreDamage:
    def test_deleting_the_newest_candles_makes_exactly_those_symbols_stale(self, filled) -> None:
        with Store(filled.database_url) as store:
            assert check_data(store, filled).ok
        done = faults.delete_candles(filled, ["BTCUSDT"], filled.stale_h1_hours + 2, timeframes=["1h"])
        assert "BTCUSDT" in done.what
        with Store(filled.database_url) as store:
            report = check_data(store, filled)
        assert not report.checks["staleness"]
        assert report.failing_symbols == ["BTCUSDT"]

    def test_a_punched_gap_fails_the_continuity_check_only(self, filled) -> None:
        before = count(filled, "ETHUSDT")
        faults.gap(filled, "ETHUSDT", filled.max_gap_candles + 2, 24)
        assert count(filled, "ETHUSDT") == before - (filled.max_gap_candles + 2)
        with Store(filled.database_url) as store:
            report = check_data(store, filled)
        assert report.checks == {"staleness": True, "coverage": True, "continuity": False}
        assert report.failing_symbols == ["ETHUSDT"]

    def test_nothing_is_touched_while_a_recovery_holds_the_store(self, filled) -> None:
        storelock.lock_path(filled.db_path).write_text("{}")
        before = count(filled, "BTCUSDT")
        with pytest.raises(FaultError) as err:
            faults.delete_candles(filled, ["BTCUSDT"], 8)
        assert "a recovery holds the store" in err.value.message
        with pytest.raises(FaultError):
            faults.corrupt_pages(filled)
        assert count(filled, "BTCUSDT") == before
        assert check_integrity(filled.db_path).ok

    def test_a_corrupted_page_shows_in_quick_check(self, filled) -> None:
        assert check_integrity(filled.db_path).ok
        done = faults.corrupt_pages(filled)
        check = check_integrity(filled.db_path)
        assert not check.ok
        assert "ohlcv_h1" in done.what and check.problems[0][:40] in done.what

    def test_a_missing_store_is_refused_with_a_hint(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path, create_store=False)
        with pytest.raises(FaultError) as err:
            faults.corrupt_pages(settings)
        assert "crypto-agent up" in err.value.hint


class TestBackups:
    def test_the_rollback_drill_gets_a_good_backup_dated_48_h_back_once(self, filled) -> None:
        now = datetime.now(UTC)
        first = chaos.ensure_backup(filled, 48, now=now)
        assert first.created
        assert first.name == backup.backup_name((now - timedelta(hours=48)).date())
        assert backup.backup_for_hours_ago(filled.backup_dir, 48, now=now).name == first.name
        again = chaos.ensure_backup(filled, 48, now=now)
        assert not again.created and again.name == first.name
        assert len(backup.list_backups(filled.backup_dir)) == 1

    def test_the_corruption_drill_reuses_a_good_backup_of_any_day(self, filled) -> None:
        backup.create(filled.db_path, filled.backup_dir, now=datetime.now(UTC) - timedelta(days=3))
        ready = chaos.ensure_backup(filled)
        assert not ready.created


class TestServices:
    def test_a_pidfile_naming_a_stranger_is_refused_and_the_stranger_survives(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        stranger = keeper.sleeper()
        spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
        spec.pidfile.write_text(f"{stranger.pid}\n")
        for sig in (signal.SIGKILL, signal.SIGSTOP):
            with pytest.raises(NotOurProcess):
                faults.kill(settings, "backtest", sig)
        assert stranger.poll() is None
        assert psutil.Process(stranger.pid).status() != psutil.STATUS_STOPPED

    def test_sigstop_then_the_cleanup_continues_our_daemon(self, filled, keeper) -> None:
        spec = process.service_spec("backtest", filled)
        started = keeper.start(spec, filled)
        done = faults.stop(filled, "backtest")
        assert done.pid == started.pid and "SIGSTOP" in done.what
        proc = psutil.Process(started.pid)
        wait_until(lambda: proc.status() == psutil.STATUS_STOPPED, 10, "the daemon stopped")
        assert faults.continue_stopped(filled, "backtest")
        wait_until(lambda: proc.status() != psutil.STATUS_STOPPED, 10, "the daemon running again")
        assert not faults.continue_stopped(filled, "backtest")

    def test_a_fault_is_injected_by_restarting_and_removed_by_a_clean_restart(self, filled, keeper) -> None:
        spec = process.service_spec("backtest", filled)
        first = keeper.start(spec, filled)
        with pytest.raises(ConfigError):
            faults.restart_with_fault(filled, "melt-down")
        assert process.inspect(spec).pid == first.pid  # a bad fault touches nothing
        faulty = faults.burn_cpu(filled)
        keeper.adopt(faulty.pid)
        assert faulty.pid != first.pid and faults.fault_of(filled, "backtest") == "burn-cpu"
        faults.restart_clean(filled, "backtest")
        keeper.adopt(process.inspect(spec).pid)
        assert faults.fault_of(filled, "backtest") is None

    def test_verify_wants_every_service_healthy_and_the_store_sound(self, filled, keeper) -> None:
        for name in ("trader", "backtest"):
            keeper.start(process.service_spec(name, filled), filled)
        wait_until(lambda: chaos.verify(filled).ok, 30, "a verified stack")
        assert "quick_check ok" in chaos.verify(filled).summary
        check = chaos.verify(filled, paused=("backtest",))
        assert not check.ok and "backtest should stay paused, but it is running" in check.problems
        storelock.lock_path(filled.db_path).write_text("{}")
        assert any("LOCKED" in p for p in chaos.verify(filled).problems)

    def test_verify_says_how_to_resume_a_paused_service(self, filled) -> None:
        holds.keep_stopped("backtest", filled, by="rollback-persistent-failures #7", reason="drill")
        check = chaos.verify(filled)
        assert ("backtest is paused (by rollback-persistent-failures #7): resume it with "
                "`crypto-agent service resume backtest`") in check.problems

    def test_an_open_incident_keeps_the_stack_unverified(self, filled) -> None:
        with incidents.open_incident_store(filled) as log:
            incidents.open_or_join(log, "stale-data", "crypto-agent.store.main", None, time.time())
        found = chaos.incidents_since(filled, time.time() - 60, ("stale-data",))
        assert [i.scenario for i in found] == ["stale-data"]
        assert chaos.incidents_since(filled, time.time() + 60) == []
        assert chaos.incidents_since(filled, 0, ("db-corruption",)) == []
        assert any("incident(s) open: #" in p for p in chaos.verify(filled).problems)


class TestSimulator:
    def test_only_a_local_exchange_takes_faults(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path, create_store=False, exchange_url="https://api.binance.com")
        with pytest.raises(FaultError) as err:
            faults.SimulatorControl.of(settings)
        assert "not the bundled simulator" in err.value.message

    def test_down_then_healed(self, tmp_path: Path) -> None:
        with Simulator(port=0) as sim:
            settings = make_settings(tmp_path, create_store=False, exchange_url=sim.url)
            control = faults.SimulatorControl.of(settings)
            faults.exchange(settings, "down", for_s=60)
            assert httpx.get(f"{sim.url}/api/v3/ping", timeout=5).status_code == 503
            faults.exchange(settings, "429", count=2, retry_after_s=1)
            assert control.faults()["storm_429"] == 2
            faults.clear_exchange(settings)
            assert httpx.get(f"{sim.url}/api/v3/ping", timeout=5).status_code == 200
            assert control.faults()["storm_429"] == 0

    def test_an_unreachable_simulator_is_a_clear_error(self, tmp_path: Path) -> None:
        with Simulator(port=0) as sim:
            url = sim.url
        control = faults.SimulatorControl.of(make_settings(tmp_path, create_store=False, exchange_url=url))
        with pytest.raises(FaultError) as err:
            control.faults()
        assert "does not answer" in err.value.message and "crypto-agent up" in err.value.hint


class TestMttrTable:
    def test_mttr_runs_from_the_symptom_and_is_judged_against_the_eta(self) -> None:
        killed = DrillResult(chaos.drill("daemon-killed"), injected_at=100, detected_at=115, recovered_at=118,
                             verified_at=120)
        spike = DrillResult(chaos.drill("cpu-spike"), injected_at=100, symptom_at=700, detected_at=710,
                            recovered_at=720, verified_at=760)
        slow = DrillResult(chaos.drill("daemon-hung"), injected_at=0, detected_at=100, recovered_at=290,
                           verified_at=400)
        lost = DrillResult(chaos.drill("db-corrupt"), injected_at=0, error="not detected within 90 s")
        assert (killed.mttr_s, spike.mttr_s, slow.mttr_s, lost.mttr_s) == (20, 60, 400, None)
        rows = chaos.mttr_table([killed, spike, slow, lost])
        assert rows[0].split()[:2] == ["scenario", "runbook"]
        assert rows[1].startswith("daemon-killed") and rows[1].endswith("within ETA") and " 20 s " in rows[1]
        assert rows[2].endswith("within ETA") and " 60 s " in rows[2]
        assert rows[3].endswith("OVER ETA") and "6.7 min" in rows[3]
        assert rows[4].endswith("NOT RECOVERED")


class TestDecisions:
    def test_each_drill_takes_its_eta_from_the_one_scenario_table(self) -> None:
        for d in chaos.DRILLS.values():
            assert d.eta_s == incidents.scenario(d.scenario).eta_s
            assert d.runbook == incidents.scenario(d.scenario).number
            assert d.line.startswith(f"{d.name} ") and f"ETA {d.eta_min:g} min" in d.line

    def test_a_closed_incident_counts_as_recovered_escalated_or_failed(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path, create_store=False)
        with incidents.open_incident_store(settings) as log:
            opened, _ = incidents.open_or_join(log, "stale-data", "crypto-agent.store.main",
                                               {"event": "crypto-agent.store.stale",
                                                "payload": {"reasons": ["BTCUSDT stale"]}}, time.time())
        recovered = replace(opened, status=incidents.RESOLVED, outcome=incidents.RECOVERED)
        escalated = replace(opened, status=incidents.ESCALATED, outcome="escalated")
        assert chaos.counts_as(recovered) == "recovered"
        assert chaos.counts_as(escalated) == "failed"
        assert chaos.counts_as(escalated, escalation_ok=True) == "escalated"
        assert chaos.counts_as(replace(opened, status=incidents.FAILED, outcome="failed"), True) == "failed"
        said = chaos.describe_trigger(settings, opened)
        assert said.startswith("crypto-agent.store.stale at ") and said.endswith("(BTCUSDT stale)")
        crashed = replace(opened, trigger={"event": "crypto-agent.service.crashed"})
        assert "(threshold automation crypto-agent/persistent-failures)" in chaos.describe_trigger(settings, crashed)
        assert chaos.describe_trigger(settings, replace(opened, trigger={})) == "a manual run (no event)"
