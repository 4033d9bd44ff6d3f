"""The backtest window's budget and the guard's decisions (crypto_agent.guard), and its acts on real processes:
only our backtest daemon is ever reniced, paused or stopped; a stranger named by the pidfile survives."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta

import psutil
import pytest

from crypto_agent import process
from crypto_agent.daemon import FAULT_ENV
from crypto_agent.guard import (
    GUARD_NAME,
    GuardAction,
    Stage,
    WindowBudget,
    WindowUsage,
    backtest_stage,
    breaches,
    current_window,
    decide,
    pause_backtest,
    renice_backtest,
    resume_backtest,
    stop_backtest,
)
from crypto_agent.health import HealthStatus, ProbeReport
from crypto_agent.holds import HOLD_PAUSED, HOLD_STOPPED, Hold, ServicePaused, read_hold
from crypto_agent.process import NotOurProcess
from crypto_agent.service import instance_id

try:
    from service_kit import keeper, make_settings, wait_until
except ImportError:  # tests/ became a package
    from tests.service_kit import keeper, make_settings, wait_until  # noqa: F401

BUDGET = WindowBudget()  # the runbook's


def report(service: str, *, cpu: float = 5.0, rss: float = 100.0, errors: float = 0.0, alive: bool = True,
           status: HealthStatus = HealthStatus.HEALTHY, niceness: int = 0) -> ProbeReport:
    """A probe report with these figures (the guard decides from reports)."""
    return ProbeReport(
        service=service, status=status if alive else HealthStatus.DEAD, pid=1234 if alive else None, alive=alive,
        zombie=False, process_status="running" if alive else None, heartbeat_age_s=1.0, heartbeat_state="running",
        cpu_pct=cpu if alive else None, rss_mb=rss if alive else None, log_errors_per_min=errors, niceness=niceness,
        reasons=[] if status is HealthStatus.HEALTHY else ["something"],
    )


def usage(trader: ProbeReport | None = None, backtest: ProbeReport | None = None) -> WindowUsage:
    return WindowUsage(trader=trader or report("trader"), backtest=backtest or report("backtest"))


def at(hour: int, minute: int, day: int = 10) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


class TestWindow:
    @pytest.mark.parametrize(("when", "start", "end"), [
        (at(23, 30), at(23, 30), at(1, 30, 11)),
        (at(23, 59), at(23, 30), at(1, 30, 11)),
        (at(0, 10), at(23, 30, 9), at(1, 30)),
        (at(1, 29), at(23, 30, 9), at(1, 30)),
    ])
    def test_inside_the_window_that_crosses_midnight(self, when: datetime, start: datetime, end: datetime) -> None:
        assert current_window(when, "23:30", "01:30") == (start, end)

    @pytest.mark.parametrize("when", [at(1, 30), at(12, 0), at(23, 29)])
    def test_outside_the_window(self, when: datetime) -> None:
        assert current_window(when, "23:30", "01:30") is None

    def test_a_window_within_one_day(self) -> None:
        assert current_window(at(9, 0), "08:00", "17:00") == (at(8, 0), at(17, 0))
        assert current_window(at(17, 0), "08:00", "17:00") is None


class TestBreaches:
    def test_within_budget(self) -> None:
        assert breaches(usage(report("trader", cpu=55), report("backtest", cpu=29)), BUDGET) == []

    def test_each_limit_of_the_runbook(self) -> None:
        found = breaches(usage(report("trader", cpu=65, rss=900, errors=4), report("backtest", cpu=35, rss=700,
                                                                                  errors=3)), BUDGET)
        assert found == ["backtest CPU 35% > 30%", "live trading CPU 65% > 60%", "total CPU 100% > 90%",
                         "memory 1600 MB > 1536 MB", "log errors 7/min > 5/min"]

    def test_a_stopped_backtest_uses_nothing(self) -> None:
        assert breaches(usage(backtest=report("backtest", alive=False)), BUDGET) == []


class TestDecide:
    OVER = usage(backtest=report("backtest", cpu=95))

    def test_the_ladder_renice_then_pause(self) -> None:
        first = decide(self.OVER, BUDGET, Stage.RUNNING, True)
        assert first.action is GuardAction.RENICE and first.page is None
        second = decide(self.OVER, BUDGET, Stage.RENICED, True)
        assert second.action is GuardAction.PAUSE and second.page == "l1"

    def test_paused_and_within_budget_stays_paused_inside_the_window(self) -> None:
        assert decide(usage(backtest=report("backtest", cpu=0)), BUDGET, Stage.PAUSED, True).action is GuardAction.NONE

    def test_paused_and_still_over_memory_is_stopped(self) -> None:
        heavy = usage(backtest=report("backtest", cpu=0, rss=1500))
        assert decide(heavy, BUDGET, Stage.PAUSED, True).action is GuardAction.STOP

    def test_live_trading_affected_stops_the_backtest_and_pages_l3(self) -> None:
        hurt = usage(trader=report("trader", status=HealthStatus.DEGRADED))
        for stage in (Stage.RUNNING, Stage.RENICED, Stage.PAUSED):
            decision = decide(hurt, BUDGET, stage, True)
            assert decision.action is GuardAction.STOP and decision.page == "l3" and decision.live_affected

    def test_live_trading_affected_with_the_backtest_already_stopped_does_nothing_more(self) -> None:
        hurt = usage(trader=report("trader", status=HealthStatus.DEGRADED), backtest=report("backtest", alive=False))
        assert decide(hurt, BUDGET, Stage.STOPPED, True).action is GuardAction.NONE

    def test_the_trader_over_its_own_share_throttles_the_backtest_never_the_trader(self) -> None:
        decision = decide(usage(trader=report("trader", cpu=70)), BUDGET, Stage.RUNNING, True)
        assert decision.action is GuardAction.RENICE  # the only lever: live trading is never throttled

    def test_after_the_window_what_the_guard_did_is_undone_and_nothing_else(self) -> None:
        assert decide(self.OVER, BUDGET, Stage.PAUSED, False).action is GuardAction.RESUME
        stopped = usage(backtest=report("backtest", alive=False))
        assert decide(stopped, BUDGET, Stage.STOPPED, False, guard_stopped=True).action is GuardAction.RESUME
        assert decide(stopped, BUDGET, Stage.STOPPED, False).action is GuardAction.NONE  # not the guard's
        assert decide(self.OVER, BUDGET, Stage.RUNNING, False).action is GuardAction.NONE

    def test_the_stage_of_the_backtest(self) -> None:
        paused = Hold("backtest", HOLD_PAUSED, GUARD_NAME, "x", instance="1234@1.00")
        assert backtest_stage(report("backtest", alive=False), None, 19) is Stage.STOPPED
        assert backtest_stage(report("backtest"), paused, 19) is Stage.PAUSED
        assert backtest_stage(report("backtest", niceness=19), None, 19) is Stage.RENICED
        assert backtest_stage(report("backtest", niceness=10), None, 19) is Stage.RUNNING


class TestActs:
    def test_renice_pause_and_resume_our_daemon(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        daemon = psutil.Process(keeper.start(spec, settings).pid)
        assert renice_backtest(settings, 19) == (daemon.pid, 19)
        until = (datetime.now(UTC) + timedelta(hours=1)).timestamp()
        hold = pause_backtest(settings, "CPU 95% > 30%", until)
        wait_until(lambda: daemon.status() == psutil.STATUS_STOPPED, timeout=10, what="SIGSTOP to land")
        assert hold.instance == instance_id(daemon.pid, daemon.create_time())
        read = read_hold("backtest", settings)
        assert read is not None and (read.kind, read.by, read.instance) == (HOLD_PAUSED, GUARD_NAME, hold.instance)
        assert read.until == int(until)  # the marker keeps whole seconds
        assert resume_backtest(settings) is True
        wait_until(lambda: daemon.status() != psutil.STATUS_STOPPED, timeout=10, what="SIGCONT to land")
        assert read_hold("backtest", settings) is None

    def test_a_pause_naming_another_instance_never_resumes_this_one(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        daemon = psutil.Process(keeper.start(spec, settings).pid)
        daemon.send_signal(signal.SIGSTOP)  # stopped by somebody else than the guard's pause
        wait_until(lambda: daemon.status() == psutil.STATUS_STOPPED, timeout=10, what="SIGSTOP to land")
        from crypto_agent.holds import place_hold

        place_hold("backtest", settings, kind=HOLD_PAUSED, by=GUARD_NAME, reason="old", instance="999999@1.00")
        assert resume_backtest(settings) is False
        assert daemon.status() == psutil.STATUS_STOPPED  # not ours to continue
        assert read_hold("backtest", settings) is None  # the guard's stale marker is gone

    def test_stop_keeps_the_backtest_stopped_under_a_hold_that_start_honours(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        pid = keeper.start(spec, settings, env={FAULT_ENV: "burn-cpu"}).pid
        result, hold = stop_backtest(settings, "live trading affected", None)
        assert result.pid == pid and result.was_running and hold.kind == HOLD_STOPPED
        with pytest.raises(ServicePaused):
            process.start(spec, settings)

    def test_a_stranger_named_by_the_pidfile_is_never_signalled(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        stranger = keeper.sleeper()
        spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
        spec.pidfile.write_text(f"{stranger.pid}\n")
        for act in (lambda: renice_backtest(settings, 19), lambda: pause_backtest(settings, "x", None),
                    lambda: stop_backtest(settings, "x", None)):
            with pytest.raises(NotOurProcess):
                act()
        proc = psutil.Process(stranger.pid)
        assert stranger.poll() is None and proc.status() != psutil.STATUS_STOPPED and proc.nice() == 0
