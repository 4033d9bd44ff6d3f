"""The decisions the recoveries take from crypto_agent.incidents, without Prefect: who is told at the close
(policy.levels_to_tell) and the root cause of each scenario (root_cause.*)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from crypto_agent import incidents
from crypto_agent.errors import CryptoAgentError
from crypto_agent.exchange import IPBanned, RateLimited
from crypto_agent.incidents import ESCALATED, FAILED, RESOLVED, Incident, levels_to_tell, root_cause

CRASH_LINE = "2026-02-22 14:30:01,123 ERROR [backtest] daemon: cycle failed: database disk image is malformed"
FATAL_LINE = "2026-02-22 14:30:02,456 CRITICAL [backtest] daemon: out of memory in step"
STRAY_LINE = "Traceback (most recent call last):"


def incident(scenario: str = "daemon-crash", status: str = RESOLVED, summary: str = "restarted") -> Incident:
    """A closed incident as the log returns it."""
    return Incident(
        id=7, scenario=scenario, resource="crypto-agent.service.backtest-daemon", family="service", status=status,
        outcome="recovered" if status == RESOLVED else "escalated", trigger={}, detected_at=1_000, fault_at=None,
        opened_at=1_000, resolved_at=2_000, detection_delay_s=None, recovery_time_s=1.0, data_lost_hours=0.0,
        actions=[], impact="", root_cause="", summary=summary, levels_told=[], events_absorbed=0,
        flow_run_id=None, owner="host:1:0.00",
    )


class TestGroupWith:
    """A fault that comes back soon after it was fixed joins the earlier one in one page (policy.group_with)."""

    def test_the_same_signal_recovered_within_the_window_is_grouped(self) -> None:
        before = incident()  # resolved at 2_000 ms
        assert incidents.group_with(before, now_ms=2_000 + 599_000, window_s=600) is before

    def test_after_the_window_it_pages_as_usual(self) -> None:
        assert incidents.group_with(incident(), now_ms=2_000 + 601_000, window_s=600) is None

    @pytest.mark.parametrize("status", [FAILED, ESCALATED])
    def test_an_earlier_incident_that_was_not_fixed_groups_nothing(self, status: str) -> None:
        assert incidents.group_with(incident(status=status), now_ms=3_000, window_s=600) is None

    def test_a_resolved_incident_the_system_did_not_recover_itself_groups_nothing(self) -> None:
        assert incidents.group_with(replace(incident(), outcome="skipped"), now_ms=3_000, window_s=600) is None

    def test_a_window_of_zero_or_no_earlier_incident_groups_nothing(self) -> None:
        assert incidents.group_with(incident(), now_ms=3_000, window_s=0) is None
        assert incidents.group_with(None, now_ms=3_000, window_s=600) is None


class TestLevelsToTell:
    def test_a_recovered_incident_tells_nobody_beyond_l1(self) -> None:
        assert levels_to_tell(incident(), 1, 24) == {}

    @pytest.mark.parametrize("status", [FAILED, ESCALATED])
    def test_a_recovery_that_did_not_succeed_tells_l2_why(self, status: str) -> None:
        got = levels_to_tell(incident(status=status, summary="no good backup"), 1, 24)
        assert got == {"l2": "the recovery did not succeed: no good backup"}

    def test_the_third_incident_of_a_scenario_in_the_window_tells_l2(self) -> None:
        assert levels_to_tell(incident(), 2, 24) == {}
        assert levels_to_tell(incident(), 3, 24) == {
            "l2": "daemon-crash happened 3 times in 24 h: the same scenario keeps coming back"}

    def test_a_failure_is_the_l2_reason_even_when_it_repeats(self) -> None:
        got = levels_to_tell(incident(status=FAILED, summary="boom"), 5, 24)
        assert got == {"l2": "the recovery did not succeed: boom"}

    def test_a_done_rollback_tells_l3(self) -> None:
        got = levels_to_tell(incident("persistent-failures"), 1, 24, live_trading_affected=True)
        assert got == {"l2": "live trading was affected: page the on-call lead",
                       "l3": "a rollback to the 48 h backup was done"}

    def test_a_failed_rollback_tells_l3_and_l2(self) -> None:
        failed = levels_to_tell(incident("persistent-failures"), 1, 24, rollback_failed=True)
        assert failed == {"l3": "the rollback FAILED: restarted"}
        escalated = levels_to_tell(incident("persistent-failures", ESCALATED, "no backup"), 1, 24)
        assert escalated == {"l2": "the recovery did not succeed: no backup", "l3": "the rollback FAILED: no backup"}

    def test_live_trading_affected_pages_the_on_call_lead_and_the_war_room(self) -> None:
        assert levels_to_tell(incident(), 1, 24, live_trading_affected=True) == {
            "l2": "live trading was affected: page the on-call lead", "l3": "live trading was affected: war room"}

    def test_an_exchange_that_cannot_be_used_is_l2_then_l3_when_banned_or_down_too_long(self) -> None:
        from crypto_agent.incidents.policy import exchange_levels

        throttled = exchange_levels(False, 0, 600_000, 3600, "HTTP 429")
        assert list(throttled) == ["l2"] and throttled["l2"].startswith("check the Binance API")
        banned = exchange_levels(True, 0, 1_000, 3600, "HTTP 418 until 14:00")
        assert banned["l3"].startswith("contact Binance: the exchange banned this IP (HTTP 418)")
        down = exchange_levels(False, 0, 3_600_000, 3600, "connection refused")
        assert "unusable for 60 min" in down["l3"]

    def test_extra_levels_are_added_or_joined_to_the_reason_a_level_has(self) -> None:
        got = levels_to_tell(incident(status=FAILED, summary="x"), 1, 24,
                             extra={"l2": "data fails validation", "l3": "the store is down"})
        assert got == {"l2": "the recovery did not succeed: x; data fails validation", "l3": "the store is down"}

    def test_an_extra_reason_already_given_is_not_repeated(self) -> None:
        got = levels_to_tell(incident(status=FAILED, summary="x"), 1, 24, extra={"l2": "x"})
        assert got == {"l2": "the recovery did not succeed: x"}

    def test_levels_come_sorted(self) -> None:
        got = levels_to_tell(incident(status=FAILED), 1, 24, live_trading_affected=True)
        assert list(got) == ["l2", "l3"]

    def test_the_window_is_printed_as_the_settings_say(self) -> None:
        got = levels_to_tell(incident("stale-data"), 4, 12.5)
        assert got["l2"].startswith("stale-data happened 4 times in 12.5 h")


class TestCrashRootCause:
    def test_the_last_error_record_is_the_cause(self) -> None:
        got = root_cause.crash_root_cause("backtest", [CRASH_LINE, STRAY_LINE])
        assert got == "Other: backtest crashed (cycle failed: database disk image is malformed)"

    def test_a_critical_record_after_an_error_wins(self) -> None:
        got = root_cause.crash_root_cause("trader", [CRASH_LINE, FATAL_LINE])
        assert got == "Other: trader crashed (out of memory in step)"

    def test_a_long_message_is_cut_to_200_characters(self) -> None:
        got = root_cause.crash_root_cause("backtest", [CRASH_LINE.replace("malformed", "x" * 500)])
        assert got.startswith("Other: backtest crashed (cycle failed")
        assert len(got) == len("Other: backtest crashed ()") + 200

    @pytest.mark.parametrize("lines", [[], [STRAY_LINE, "ValueError: bad"]])
    def test_no_error_record_means_killed_from_outside(self, lines: list[str]) -> None:
        got = root_cause.crash_root_cause("backtest", lines)
        assert got.startswith("Other: backtest died without logging an error (killed from outside: SIGKILL")
        assert root_cause.last_error(lines) is None


class TestExchangeRootCauses:
    def test_a_429_is_an_api_throttle(self) -> None:
        exc = RateLimited(120.0, "http://x", "weight used up")
        assert root_cause.exchange_root_cause(exc) == "API throttle: " + exc.message

    def test_a_418_ban_is_an_api_throttle(self) -> None:
        exc = IPBanned(datetime(2026, 1, 1, tzinfo=UTC), "http://x")
        assert root_cause.exchange_root_cause(exc).startswith("API throttle: the exchange at http://x banned")

    def test_anything_else_is_the_exchange_unreachable(self) -> None:
        got = root_cause.exchange_root_cause(CryptoAgentError("connection refused"))
        assert got == "Other: exchange unreachable: connection refused"

    def test_used_weight_at_the_safety_margin_is_a_throttle(self) -> None:
        assert root_cause.stale_root_cause(0.8, 0.8, ["BTCUSDT"]) == "API throttle: used weight at 80%"

    def test_below_the_margin_the_candles_are_missing_for_the_symbols(self) -> None:
        got = root_cause.stale_root_cause(0.1, 0.8, ["BTCUSDT", "ETHUSDT"])
        assert got == "Other: candles missing or late (BTCUSDT, ETHUSDT)"
        assert root_cause.stale_root_cause(None, 0.8, []) == "Other: candles missing or late (none)"

    def test_at_most_ten_symbols_are_named(self) -> None:
        got = root_cause.stale_root_cause(None, 0.8, [f"S{i}USDT" for i in range(12)])
        assert "S9USDT" in got and "S10USDT" not in got


class TestStoreAndHangRootCauses:
    def test_corruption_names_the_first_three_problems(self) -> None:
        got = root_cause.corruption_root_cause(["a", "b", "c", "d"])
        assert got == "DB corruption: a; b; c"

    def test_a_hang_names_what_the_probe_found(self) -> None:
        got = root_cause.hang_root_cause(["Heartbeat stale 300s", "CPU 99%"], "crypto-agent.service.hung", "x")
        assert got == "Process hang: Heartbeat stale 300s; CPU 99%"

    def test_a_hang_the_probe_did_not_see_names_the_event(self) -> None:
        got = root_cause.hang_root_cause([], "crypto-agent.service.cpu-high", "HEALTHY: PID 12")
        assert got == "Process hang: crypto-agent.service.cpu-high (HEALTHY: PID 12 when looked at)"

    def test_every_root_cause_ticks_a_box_of_the_report(self) -> None:
        for cause in (root_cause.corruption_root_cause(["x"]), root_cause.hang_root_cause(["y"], None, ""),
                      root_cause.stale_root_cause(0.9, 0.8, [])):
            assert "[x]" in incidents.root_cause_boxes(cause).split("[x] Other")[0]


def test_the_package_keeps_every_name_and_never_imports_prefect() -> None:
    code = ("import sys\nfrom crypto_agent import incidents\n"
            "assert incidents.scenario('stale-data').eta_s == 900 and len(incidents.SCENARIOS) == 5\n"
            "assert callable(incidents.open_incident_store) and incidents.policy.levels_to_tell\n"
            "assert not any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules), 'prefect imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert replace(incident(), id=8).id == 8


class TestNeedsPersonAction:
    """The same unfixed signal joins the incident that needs a person; paged at most every repeat_after_s."""

    HOUR_MS = 3_600_000

    def waiting(self, last_paged_at: int | None = 10 * 3_600_000, detections: int = 3) -> Incident:
        return replace(incident(status=ESCALATED, summary="the exchange cannot be used"), needs_person=True,
                       needs_person_since=9 * self.HOUR_MS, last_paged_at=last_paged_at, detections=detections)

    def test_without_an_incident_that_needs_a_person_it_opens_and_pages_as_usual(self) -> None:
        for waiting in (None, incident(status=RESOLVED), incident(status=ESCALATED)):  # the last: a person cleared it
            got = incidents.needs_person_action(waiting, now_ms=0, repeat_after_s=14400)
            assert (got.join, got.page) == (False, incidents.policy.PAGE_AS_USUAL)
            closing = incidents.needs_person_action(waiting, FAILED, now_ms=0, repeat_after_s=14400)
            assert (closing.join, closing.page) == (False, incidents.policy.PAGE_AS_USUAL)

    def test_a_new_detection_joins_it_with_its_paging_held(self) -> None:
        got = incidents.needs_person_action(self.waiting(), now_ms=11 * self.HOUR_MS, repeat_after_s=14400)
        assert (got.join, got.page) == (True, incidents.policy.PAGE_HOLD)
        assert got.why == ("incident #7 needs a person (3 detections since 1970-01-01T09:00:00Z): "
                           "the recovery runs again in it, its paging held")

    @pytest.mark.parametrize("status", [FAILED, ESCALATED])
    def test_failing_again_is_held_until_the_last_page_is_repeat_after_s_old(self, status: str) -> None:
        held = incidents.needs_person_action(self.waiting(), status, now_ms=14 * self.HOUR_MS - 1,
                                             repeat_after_s=14400)
        assert (held.join, held.page) == (True, incidents.policy.PAGE_HOLD)
        assert "last paged 1970-01-01T10:00:00Z, re-paged from 1970-01-01T14:00:00Z" in held.why
        again = incidents.needs_person_action(self.waiting(), status, now_ms=14 * self.HOUR_MS, repeat_after_s=14400)
        assert (again.join, again.page) == (True, incidents.policy.PAGE_REPEAT)
        assert again.why == "still needs a person (3 detections since 1970-01-01T09:00:00Z)"

    def test_never_paged_it_is_re_paged_and_one_detection_is_singular(self) -> None:
        got = incidents.needs_person_action(self.waiting(None, 1), ESCALATED, now_ms=0, repeat_after_s=14400)
        assert got.page == incidents.policy.PAGE_REPEAT and "(1 detection since" in got.why

    def test_fixed_by_a_later_recovery_it_pages_resolved_once(self) -> None:
        got = incidents.needs_person_action(self.waiting(), RESOLVED, now_ms=10 * self.HOUR_MS + 1,
                                            repeat_after_s=14400)
        assert (got.join, got.page) == (True, incidents.policy.PAGE_RESOLVED)
        assert got.why == "fixed after it needed a person (3 detections since 1970-01-01T09:00:00Z)"

    def test_resolved_only_by_a_handover_to_another_incident_holds_that_one_pages(self) -> None:
        got = incidents.needs_person_action(self.waiting(), RESOLVED, now_ms=0, repeat_after_s=14400, handed_to=9)
        assert (got.join, got.page, got.why) == (True, incidents.policy.PAGE_HOLD,
                                                 "handed over to incident #9, which pages for it")
