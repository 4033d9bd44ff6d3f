"""The paging decisions of crypto_agent.alerts, on a real SQLite incident log."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from crypto_agent import alerts
from crypto_agent.alerts import JobRun
from crypto_agent.service import STATE_PAUSED_LIVE_TRADING
from crypto_agent.store import Store


def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'incidents.db'}", create=False)
    alerts.ensure_episodes_table(s)
    return s


class TestEpisodes:
    def test_a_lasting_condition_is_paged_once_then_after_the_repeat_interval(self, tmp_path: Path) -> None:
        s = store(tmp_path)
        first = alerts.episode_step(s, "k", True, repeat_after_s=100, now=1000)
        again = alerts.episode_step(s, "k", True, repeat_after_s=100, now=1050)
        later = alerts.episode_step(s, "k", True, repeat_after_s=100, now=1100)
        assert (first.page, first.started, again.page, later.page) == (True, True, False, True)
        assert later.episode is not None and later.episode.pages == 2

    def test_a_cleared_condition_ends_the_episode_and_the_next_one_pages_at_once(self, tmp_path: Path) -> None:
        s = store(tmp_path)
        alerts.episode_step(s, "k", True, repeat_after_s=100, now=1000)
        ended = alerts.episode_step(s, "k", False, repeat_after_s=100, now=1010)
        assert ended.ended and not ended.page
        assert alerts.episode_step(s, "k", True, repeat_after_s=100, now=1020).page


def test_log_errors_over_the_limit_page_l1_with_the_lines_and_no_secret() -> None:
    line = "2026-01-01T00:00:00Z ERROR x[1]: POST https://hooks.slack.com/services/T/B/secret failed api_key=abc123"
    alert = alerts.log_errors_alert("backtest", 9.0, 5, [line])
    assert alert is not None and alert.level == "l1"
    assert "secret" not in alert.body and "abc123" not in alert.body and "failed" in alert.body
    assert alerts.log_errors_alert("backtest", 5.0, 5, [line]) is None


class TestResultsStale:
    kw: ClassVar[dict[str, object]] = {
        "alive": True, "started_at": 0.0, "hold": None, "max_age_s": 7200.0, "now": 10_000.0}

    def test_a_daemon_running_past_the_limit_with_old_results_is_stale(self) -> None:
        verdict = alerts.results_stale(newest_result_at=1000.0, heartbeat_state="running", **self.kw)  # type: ignore[arg-type]
        assert verdict is not None and verdict.newest_result_age_s == 9000.0

    def test_a_daemon_paused_for_live_trading_or_young_is_not_stale(self) -> None:
        assert alerts.results_stale(newest_result_at=None, heartbeat_state=STATE_PAUSED_LIVE_TRADING, **self.kw) is None  # type: ignore[arg-type]
        young = {**self.kw, "started_at": 5000.0}
        assert alerts.results_stale(newest_result_at=None, heartbeat_state="running", **young) is None  # type: ignore[arg-type]


def run(i: str, state_type: str = "FAILED", state_name: str = "Failed", start: float = 100.0,
        tags: tuple[str, ...] = ("crypto-agent", "runbook")) -> JobRun:
    return JobRun(i, f"run-{i}", "data-update", "data-update/daily", tags, state_type, state_name, "boom", start)


class TestJobAlert:
    def test_a_first_failure_pages_l1_and_a_second_in_a_row_l2(self) -> None:
        first = alerts.job_alert("Failed", run("a"), None, late_after_s=300, now=200)
        prev = alerts.previous_outcome(run("b", start=200), [run("a")])
        second = alerts.job_alert("Failed", run("b", start=200), prev, late_after_s=300, now=300)
        assert first is not None and first.level == "l1"
        assert second is not None and second.level == "l2" and "run-a" in second.body

    def test_recoveries_are_not_watched_and_a_late_run_waits_for_the_runbook_limit(self) -> None:
        recovery = run("r", tags=("runbook", "recovery"))
        assert alerts.job_alert("Failed", recovery, None, late_after_s=300, now=200) is None
        late = run("l", "SCHEDULED", "Late", start=100)
        assert alerts.job_alert("Late", late, None, late_after_s=300, now=200) is None
        paged = alerts.job_alert("Late", late, None, late_after_s=300, now=401)
        assert paged is not None and paged.level == "l1"
