"""What monitoring concludes without Prefect (crypto_agent.monitor): the conditions a probe shows (a hold
covering it wins), crashes claimed once in a real store, heartbeats seen once. Holds: tests/test_holds.py."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil

from crypto_agent import health, process
from crypto_agent.health import HealthStatus, ProbeReport
from crypto_agent.holds import (
    HOLD_PAUSED,
    HOLD_STOPPED,
    place_hold,
    read_hold,
)
from crypto_agent.monitor import (
    FINDING_DEAD,
    FINDING_HUNG,
    FINDING_STORE_CORRUPT,
    Condition,
    HeartbeatWatch,
    ServiceWatch,
    assess,
    claim_crashes,
)
from crypto_agent.service import instance_id, record_event, store_corrupt_state, write_heartbeat
from crypto_agent.store import Store

try:
    from service_kit import keeper, make_settings, wait_until
except ImportError:  # tests/ became a package
    from tests.service_kit import keeper, make_settings, wait_until  # noqa: F401


def report(*, alive: bool = True, age: float | None = 1.0, cpu: float = 5.0, rss: float = 100.0,
           process_status: str = "sleeping", reasons: list[str] | None = None) -> ProbeReport:
    """A probe report of the backtest with these figures (as health.probe builds them)."""
    status = HealthStatus.DEAD if not alive else (HealthStatus.DEGRADED if reasons else HealthStatus.HEALTHY)
    return ProbeReport(
        service="backtest", status=status, pid=4321 if alive else None, alive=alive, zombie=False,
        process_status=process_status if alive else None, heartbeat_age_s=age, heartbeat_state="running",
        cpu_pct=cpu if alive else None, rss_mb=rss if alive else None, log_errors_per_min=0.0, niceness=10,
        reasons=reasons or ([] if alive else ["No PID file"]),
    )


class TestAssess:
    def test_healthy(self, tmp_path) -> None:
        assert assess(report(), make_settings(tmp_path)).conditions == (Condition.HEALTHY,)

    def test_dead(self, tmp_path) -> None:
        found = assess(report(alive=False), make_settings(tmp_path))
        assert found.conditions == (Condition.DEAD,) and found.payload()["status"] == "DEAD"

    def test_hung_when_stopped_or_stale_or_silent(self, tmp_path) -> None:
        settings = make_settings(tmp_path)  # heartbeat limit 3 s
        assert assess(report(process_status="stopped"), settings).conditions == (Condition.HUNG,)
        stale = assess(report(age=10.0, reasons=["Heartbeat stale 10s"]), settings)
        assert stale.conditions == (Condition.HUNG,) and "heartbeat stale 10s > 3s" in stale.reasons[0]
        assert assess(report(age=None, reasons=["No heartbeat file"]), settings).conditions == (Condition.HUNG,)

    def test_cpu_high_comes_from_history_and_memory_high_from_the_sample(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        assert assess(report(cpu=99.0, reasons=["CPU 99% > 90%"]), settings).conditions == (Condition.DEGRADED,)
        assert assess(report(cpu=99.0), settings, cpu_high=True).conditions == (Condition.CPU_HIGH,)
        both = assess(report(rss=900.0), settings, cpu_high=True)
        assert both.conditions == (Condition.CPU_HIGH, Condition.MEMORY_HIGH)

    def test_a_hold_that_covers_the_service_wins(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        place_hold("backtest", settings, kind=HOLD_STOPPED, by="rollback", reason="investigation")
        found = assess(report(alive=False), settings, hold=read_hold("backtest", settings))
        assert found.conditions == (Condition.HELD,) and found.payload()["hold"]["by"] == "rollback"

    def test_a_paused_hold_covers_only_the_instance_it_paused(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        daemon = psutil.Process(keeper.start(spec, settings).pid)
        daemon.send_signal(signal.SIGSTOP)
        mine = place_hold("backtest", settings, kind=HOLD_PAUSED, by="guard", reason="x",
                          instance=instance_id(daemon.pid, daemon.create_time()))
        probed = health.probe(spec, settings, cpu_sample_s=0.05)
        assert assess(probed, settings, hold=mine).conditions == (Condition.HELD,)
        other = place_hold("backtest", settings, kind=HOLD_PAUSED, by="guard", reason="x", instance="1@1.00")
        assert assess(probed, settings, hold=other).conditions == (Condition.HUNG,)
        # a stopped hold does not cover a service that runs
        stopped = place_hold("backtest", settings, kind=HOLD_STOPPED, by="x", reason="x")
        assert assess(probed, settings, hold=stopped).conditions == (Condition.HUNG,)


class TestClaimCrashes:
    def test_each_crash_is_claimed_once(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        with Store(settings.database_url) as store:
            for pid in (101, 102):
                record_event(store, "backtest", "crashed", pid=pid, instance=f"{pid}@1.00", source="probe")
            record_event(store, "backtest", "stopped", pid=103, instance="103@1.00", source="service")
            record_event(store, "trader", "crashed", pid=104, instance="104@1.00", source="probe")
            first = claim_crashes(store, ["backtest"])
            assert [c["pid"] for c in first] == [101, 102]
            assert claim_crashes(store, ["backtest"]) == []
            record_event(store, "backtest", "crashed", pid=105, instance="105@1.00", source="process-control")
            assert [c["pid"] for c in claim_crashes(store)] == [104, 105]

    def test_old_crashes_and_a_locked_store_claim_nothing(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        with Store(settings.database_url) as store:
            record_event(store, "backtest", "crashed", pid=101, instance="101@1.00", source="probe",
                         at=time.time() - 25 * 3600)
            assert claim_crashes(store, window_hours=24) == []
            record_event(store, "backtest", "crashed", pid=102, instance="102@1.00", source="probe")
            lock = settings.db_path.parent / "LOCKED"
            lock.write_text(json.dumps({"owner": "test"}))
            assert claim_crashes(store) == []
            lock.unlink()
            assert [c["pid"] for c in claim_crashes(store)] == [102]


class TestHeartbeatWatch:
    def test_a_heartbeat_is_signalled_once_per_advance(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        spec.heartbeat.parent.mkdir(parents=True, exist_ok=True)
        watch = HeartbeatWatch(settings, ("backtest",), vouch_every_s=5.0)
        assert watch.poll(now=1000.0) == []
        write_heartbeat(spec.heartbeat, "running: unit 1", pid=4321, now=1000.0)
        [beat] = watch.poll(now=1000.5)
        assert (beat.epoch, beat.state, beat.pid, beat.vouched) == (1000, "running: unit 1", 4321, False)
        assert watch.poll(now=1001.0) == [] and watch.poll(now=1020.0) == []
        write_heartbeat(spec.heartbeat, "running: unit 2", pid=4321, now=1021.0)
        assert [b.state for b in watch.poll(now=1021.2)] == ["running: unit 2"]
        spec.heartbeat.write_text("garbage")
        assert watch.poll(now=1030.0) == []

    def test_a_held_service_is_vouched_for_and_an_unheld_silent_one_is_not(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        watch = HeartbeatWatch(settings, ("backtest", "trader"), vouch_every_s=5.0)
        place_hold("backtest", settings, kind=HOLD_STOPPED, by="rollback", reason="investigation")
        [vouch] = watch.poll(now=time.time())
        assert vouch.service == "backtest" and vouch.vouched and vouch.state.startswith("held: stopped by rollback")
        assert watch.poll(now=time.time() + 1) == []  # not before vouch_every_s
        assert [b.service for b in watch.poll(now=time.time() + 6)] == ["backtest"]

    def test_a_stopped_hold_does_not_vouch_for_a_running_process(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        pid = keeper.start(spec, settings).pid
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=10, what="SIGSTOP")
        watch = HeartbeatWatch(settings, ("backtest",), vouch_every_s=0.0)
        watch.poll()  # the last heartbeat it wrote
        place_hold("backtest", settings, kind=HOLD_STOPPED, by="x", reason="x")
        assert [b for b in watch.poll(now=time.time() + 1) if b.vouched] == []


class TestServiceWatch:
    """Issue 10: a service's exit, or its report of a corrupt store, seen at the next look, once per instance."""

    def test_a_killed_service_is_dead_once_after_the_confirming_look(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        proc = psutil.Process(keeper.start(spec, settings).pid)
        watch = ServiceWatch(settings, ("backtest",), confirm_s=0.0)
        assert watch.look() == []  # alive: seen, nothing to say
        proc.kill()
        wait_until(lambda: not process.inspect(spec).alive, timeout=10, what="the daemon gone")
        found = watch.look() + watch.look()
        assert [(f.service, f.kind, f.pid) for f in found] == [("backtest", FINDING_DEAD, proc.pid)]
        assert found[0].payload()["service"] == "backtest" and found[0].payload()["status"] == "DEAD"
        assert watch.look() == []  # the same instance is reported once

    def test_a_clean_stop_or_a_covering_hold_is_not_a_death(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings)
        watch = ServiceWatch(settings, ("backtest",), confirm_s=0.0)
        watch.look()
        process.stop(spec)
        assert watch.look() + watch.look() == []  # the pidfile went with the clean stop
        proc = psutil.Process(keeper.start(spec, settings).pid)
        watch.look()
        place_hold("backtest", settings, kind=HOLD_STOPPED, by="test", reason="kept down")
        proc.kill()
        wait_until(lambda: not process.inspect(spec).alive, timeout=10, what="the daemon gone")
        assert watch.look() + watch.look() == []

    def test_a_live_service_silent_past_the_heartbeat_limit_is_hung_once_per_silence(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        limit = settings.heartbeat_max_age_s
        spec = process.service_spec("backtest", settings)
        pid = keeper.start(spec, settings).pid
        os.kill(pid, signal.SIGSTOP)  # so the heartbeats written below stay
        wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=10, what="SIGSTOP")
        try:
            epoch = write_heartbeat(spec.heartbeat, "running", pid=pid)
            watch = ServiceWatch(settings, ("backtest",))
            assert watch.look(now=epoch + limit - 1) == []  # inside the limit
            found = watch.look(now=epoch + limit + 1)
            assert [(f.service, f.kind, f.pid) for f in found] == [("backtest", FINDING_HUNG, pid)]
            payload = found[0].payload()
            assert payload["conditions"] == ["hung"] and payload["alive"] is True and payload["pid"] == pid
            assert payload["heartbeat_age_s"] == limit + 1 and "stale" in payload["reasons"][0]
            assert watch.look(now=epoch + limit + 5) == []  # the same silence is reported once
            later = write_heartbeat(spec.heartbeat, "running", pid=pid, now=epoch + limit + 10)  # it beat again
            assert watch.look(now=later + 1) == []
            assert [f.kind for f in watch.look(now=later + limit + 1)] == [FINDING_HUNG]  # a new silence
            again = write_heartbeat(spec.heartbeat, "running", pid=pid, now=later + limit + 10)
            place_hold("backtest", settings, kind=HOLD_PAUSED, by="test", reason="paused on purpose",
                       instance=process.inspect(spec).record.instance)
            assert watch.look(now=again + limit + 1) == []  # paused on purpose (a window guard's SIGSTOP): no hang
        finally:
            os.kill(pid, signal.SIGCONT)

    def test_an_instance_that_never_beats_is_hung_once_its_start_is_older_than_the_limit(self, tmp_path,
                                                                                         keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        pid = keeper.start(spec, settings).pid
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=10, what="SIGSTOP")
        try:
            write_heartbeat(spec.heartbeat, "running", pid=pid + 1)  # a heartbeat, but of another instance
            started = process.inspect(spec).record.started_at
            watch = ServiceWatch(settings, ("backtest",))
            assert watch.look(now=started + settings.heartbeat_max_age_s - 1) == []
            found = watch.look(now=started + settings.heartbeat_max_age_s + 1)
            assert [f.kind for f in found] == [FINDING_HUNG] and "no heartbeat" in found[0].reason
            assert found[0].payload()["heartbeat_state"] is None
        finally:
            os.kill(pid, signal.SIGCONT)

    def test_a_store_corrupt_heartbeat_is_reported_once_per_instance(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        pid = keeper.start(spec, settings).pid
        os.kill(pid, signal.SIGSTOP)  # so the heartbeat below stays as written
        wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=10, what="SIGSTOP")
        watch = ServiceWatch(settings, ("backtest",))
        assert watch.look() == []
        write_heartbeat(spec.heartbeat, store_corrupt_state("database disk image is malformed"), pid=pid)
        found = watch.look()
        assert [f.kind for f in found] == [FINDING_STORE_CORRUPT]
        assert found[0].payload()["check"] == "service"
        assert found[0].payload()["error"] == "database disk image is malformed"
        assert watch.look() == []
        os.kill(pid, signal.SIGCONT)
