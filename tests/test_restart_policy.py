"""The restart backoff: at once the first time, then 10 s doubling to 5 min, reset after 10 min healthy."""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto_agent import restart_policy
from crypto_agent.restart_policy import Decision, RestartState, decide, restart_delay, store_fault
from crypto_agent.service import record_event
from crypto_agent.store import Store

T0 = 1_800_000_000.0


def crash_loop(n: int, uptime_s: float = 5.0, start: float = T0) -> tuple[list[float], list[float]]:
    """n crashes, each uptime_s after a start that came right after the crash before it."""
    starts, crashes = [], []
    t = start
    for _ in range(n):
        starts.append(t)
        t += uptime_s
        crashes.append(t)
        t += 1.0
    return starts, crashes


class TestFirstCrash:
    def test_no_history_restarts_at_once(self) -> None:
        decision = restart_delay([], [], T0)
        assert decision == Decision(RestartState.RESTART, 0.0, 1, "restart at once: first crash", T0)
        assert decision.at_once

    def test_one_recorded_crash_restarts_at_once(self) -> None:
        starts, crashes = crash_loop(1)
        decision = restart_delay(starts, crashes, crashes[-1] + 1)
        assert (decision.state, decision.delay_s, decision.attempt) == (RestartState.RESTART, 0.0, 1)
        assert decision.reason == "restart at once: first crash"

    def test_a_crash_after_ten_healthy_minutes_starts_a_new_loop(self) -> None:
        starts, crashes = crash_loop(5)  # a loop that ended with a start that then ran 11 minutes
        starts.append(crashes[-1] + 1)
        crashes.append(starts[-1] + 11 * 60)
        decision = restart_delay(starts, crashes, crashes[-1] + 0.5)
        assert decision.state is RestartState.RESTART and decision.attempt == 1
        assert decision.reason == "restart at once: first crash after more than 10 min healthy"


class TestBackoff:
    @pytest.mark.parametrize(("n", "hold"), [(2, 10), (3, 20), (4, 40), (5, 80), (6, 160), (7, 300), (12, 300)])
    def test_the_hold_doubles_from_ten_seconds_to_the_cap(self, n: int, hold: float) -> None:
        starts, crashes = crash_loop(n)
        decision = restart_delay(starts, crashes, crashes[-1])
        assert (decision.state, decision.attempt, decision.delay_s) == (RestartState.BACKOFF, n, hold)
        assert decision.restart_at == crashes[-1] + hold

    def test_the_reason_says_the_hold_and_the_crash_count(self) -> None:
        starts, crashes = crash_loop(4)
        assert restart_delay(starts, crashes, crashes[-1]).reason == (
            "backoff 40 s: 4th crash within 10 min of a start (healthy for 10 min resets it)")

    def test_the_cap_is_named(self) -> None:
        starts, crashes = crash_loop(9)
        assert restart_delay(starts, crashes, crashes[-1]).reason.startswith("backoff 300 s (the cap): 9th crash")

    def test_time_since_the_crash_is_deducted(self) -> None:
        starts, crashes = crash_loop(4)
        decision = restart_delay(starts, crashes, crashes[-1] + 15)
        assert decision.delay_s == 25 and decision.reason.endswith("; 25 s left")

    def test_a_hold_already_over_restarts_now(self) -> None:
        starts, crashes = crash_loop(3)
        decision = restart_delay(starts, crashes, crashes[-1] + 60)
        assert decision.state is RestartState.BACKOFF and decision.delay_s == 0 and decision.at_once
        assert decision.reason.endswith("; the hold is over, restart now")

    def test_an_unrecorded_crash_after_the_newest_start_counts_at_now(self) -> None:
        starts, crashes = crash_loop(2)
        starts.append(crashes[-1] + 1)  # restarted, then died again: not yet in service_events
        now = starts[-1] + 3
        decision = restart_delay(starts, crashes, now)
        assert decision.attempt == 3 and decision.delay_s == 20 and decision.restart_at == now + 20

    def test_the_numbers_are_parameters(self) -> None:
        starts, crashes = crash_loop(3, uptime_s=100)
        decision = restart_delay(starts, crashes, crashes[-1], base_s=1, cap_s=3, reset_after_s=50)
        assert decision.state is RestartState.RESTART  # 100 s up > 50 s: every crash is a first
        starts, crashes = crash_loop(5)
        decision = restart_delay(starts, crashes, crashes[-1], base_s=1, cap_s=3)
        assert (decision.attempt, decision.delay_s) == (5, 3)

    def test_crashes_without_starts_chain_by_their_gaps(self) -> None:
        assert restart_policy.crash_streak([], [T0, T0 + 30, T0 + 60]) == 3
        assert restart_policy.crash_streak([], [T0, T0 + 30, T0 + 700]) == 1
        assert restart_policy.crash_streak([], []) == 0


class TestStoreFault:
    @pytest.mark.parametrize("line", [
        "2026-12-02 03:22:01 ERROR trader | sqlite3.DatabaseError: database disk image is malformed",
        "sqlalchemy.exc.DatabaseError: (sqlite3.DatabaseError) file is not a database",
        "sqlite3.DatabaseError: malformed database schema (ix_x) - invalid rootpage",
        "Error: SQLITE_CORRUPT on page 12",
        "the database looks malformed",
    ])
    def test_sqlite_corruption_messages_are_the_stores_fault(self, line: str) -> None:
        assert store_fault(["INFO started", line, "INFO bye"]) == line.strip()

    @pytest.mark.parametrize("line", [
        "ERROR request body: malformed JSON",
        "ERROR database is locked",
        "ERROR sqlite3.OperationalError: disk I/O error",
    ])
    def test_other_errors_are_not(self, line: str) -> None:
        assert store_fault([line]) is None

    def test_the_store_skips_the_backoff(self) -> None:
        starts, crashes = crash_loop(6)
        lines = ["ERROR trader | sqlite3.DatabaseError: database disk image is malformed"]
        decision = decide(starts, crashes, crashes[-1], log_lines=lines)
        assert decision.state is RestartState.STORE_CORRUPT and decision.delay_s == 0 and decision.attempt == 6
        assert decision.reason == ("corruption recovery at once, whatever the backoff: the service died of the "
                                   "store (ERROR trader | sqlite3.DatabaseError: database disk image is malformed)")

    def test_without_a_store_fault_decide_is_the_backoff(self) -> None:
        starts, crashes = crash_loop(3)
        assert decide(starts, crashes, crashes[-1], log_lines=["ERROR boom"]) == restart_delay(
            starts, crashes, crashes[-1])


class TestHistory:
    def test_starts_and_failures_come_from_service_events(self, tmp_path: Path) -> None:
        store = Store(f"sqlite:///{tmp_path / 'db' / 'store.db'}")
        try:
            now = T0 + 3600
            for i, (kind, at) in enumerate([("started", T0), ("crashed", T0 + 5), ("started", T0 + 6),
                                            ("killed", T0 + 20), ("started", T0 + 21), ("start-failed", T0 + 22),
                                            ("stopped", T0 + 30)]):
                record_event(store, "trader", kind, pid=100 + i, instance=f"{100 + i}@1", source="test", at=at)
            record_event(store, "backtest", "crashed", pid=1, instance="1@1", source="test", at=T0 + 7)
            record_event(store, "trader", "crashed", pid=9, instance="9@1", source="test", at=T0 - 90_000)
            starts, crashes = restart_policy.history(store, "trader", now)
            assert starts == [T0, T0 + 6, T0 + 21]
            assert crashes == [T0 + 5, T0 + 20, T0 + 22]
            decision = restart_delay(starts, crashes, T0 + 23)
            assert decision.attempt == 3 and decision.delay_s == 19
        finally:
            store.close()


class TestStaleSignal:
    def test_a_healthy_instance_started_after_the_signal_answers_it(self) -> None:
        from crypto_agent.recovery import stale_signal

        why = stale_signal(True, started_at=1010.0, detected_at=1000.0, pid=42)
        assert why == ("a late report of a crash already recovered: PID 42 is HEALTHY, started 10.0 s after the "
                       "signal's detection")

    def test_an_older_or_unhealthy_instance_or_an_unknown_time_does_not(self) -> None:
        from crypto_agent.recovery import stale_signal

        assert stale_signal(True, started_at=990.0, detected_at=1000.0) is None  # the signal may be about it
        assert stale_signal(False, started_at=1010.0, detected_at=1000.0) is None
        assert stale_signal(True, started_at=None, detected_at=1000.0) is None
        assert stale_signal(True, started_at=1010.0, detected_at=None) is None

    def test_a_report_about_another_pid_or_a_heartbeat_alarm_of_a_healthy_service_is_answered(self) -> None:
        from crypto_agent.recovery import stale_signal

        assert stale_signal(True, 990.0, 1000.0, pid=7, reported_pid=6) == \
            "a report about PID 6, which is gone: PID 7 is HEALTHY"
        assert stale_signal(True, 990.0, 1000.0, pid=7, heartbeat_signal=True).startswith("a false alarm: PID 7")
        assert stale_signal(True, 990.0, 1000.0, pid=7, reported_pid=7) is None  # the signal is about it
        assert stale_signal(False, 990.0, 1000.0, pid=7, heartbeat_signal=True) is None  # silent and not healthy

