"""The rollback's human gate, with no server: the backup it would restore (chosen from real backups, nothing
restored), how it waits, and what it does with an answer or a timeout."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from crypto_agent import approval, backup
from crypto_agent.approval import ASK_AGAIN, GIVE_UP, MAX_ASKS, PROCEED, REJECT, Answer
from crypto_agent.store import Store

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "db" / "market.db"
    path.parent.mkdir()
    Store(f"sqlite:///{path}").close()
    return path


class TestPlanRollback:
    def test_it_names_the_newest_good_backup_at_least_rollback_hours_old_and_restores_nothing(
        self, db: Path, tmp_path: Path
    ) -> None:
        backups = tmp_path / "backups"
        three_days = backup.create(db, backups, now=NOW - timedelta(days=3))
        two_days = backup.create(db, backups, now=NOW - timedelta(days=2))
        backup.create(db, backups, now=NOW - timedelta(days=1))
        before = sorted(p.name for p in backups.iterdir())

        plan = approval.plan_rollback(backups, 48, tmp_path / "quarantine", NOW_MS)

        assert plan is not None and plan.backup.path == two_days.path != three_days.path
        assert plan.taken_at_ms == int((NOW - timedelta(days=2)).timestamp() * 1000)
        assert plan.newer_hours == 48.0
        assert sorted(p.name for p in backups.iterdir()) == before  # chosen, not restored
        assert not (tmp_path / "quarantine").exists()
        assert plan.describe() == (
            f"would restore {two_days.name} (taken 2026-03-13T12:00:00Z, 48.0 h ago): the 48.0 h of data newer "
            f"than it are replaced, the current database kept in quarantine in {tmp_path / 'quarantine'} "
            "(candles are re-fetched from the exchange afterwards)")

    def test_a_bad_backup_is_never_planned(self, db: Path, tmp_path: Path) -> None:
        backups = tmp_path / "backups"
        older = backup.create(db, backups, now=NOW - timedelta(days=3))
        bad = backup.create(db, backups, now=NOW - timedelta(days=2))
        manifest = bad.manifest_path.read_text().replace('"status": "good"', '"status": "bad"')
        bad.manifest_path.write_text(manifest)
        plan = approval.plan_rollback(backups, 48, tmp_path / "q", NOW_MS)
        assert plan is not None and plan.backup.path == older.path and plan.newer_hours == 72.0

    def test_no_backup_old_enough_plans_nothing(self, db: Path, tmp_path: Path) -> None:
        backups = tmp_path / "backups"
        backup.create(db, backups, now=NOW - timedelta(days=1))
        assert approval.plan_rollback(backups, 48, tmp_path / "q", NOW_MS) is None
        assert approval.plan_rollback(tmp_path / "none", 48, tmp_path / "q", NOW_MS) is None


class TestPausePlan:
    def test_proceed_asks_once_with_the_setting_s_timeout(self) -> None:
        assert approval.pause_plan(1800, "proceed", 7200) == approval.PausePlan(1800, 5, 1, "proceed")

    def test_wait_asks_again_within_the_budget_and_at_most_max_asks_times(self) -> None:
        assert approval.pause_plan(1800, "wait", 7200).asks == 4
        assert approval.pause_plan(3000, "wait", 7200).asks == 2
        assert approval.pause_plan(2, "wait", 7200).asks == MAX_ASKS  # a tiny timeout never pages L3 thousands of times
        assert approval.pause_plan(0, "wait", 7200).asks == MAX_ASKS

    def test_a_timeout_longer_than_the_budget_is_cut_to_it(self) -> None:
        assert approval.pause_plan(10_000, "proceed", 7200).timeout_s == 7200

    def test_fractions_round_up_to_whole_seconds_and_short_pauses_poll_every_second(self) -> None:
        plan = approval.pause_plan(1.2, "proceed", 7200)
        assert (plan.timeout_s, plan.poll_s) == (2, 1)

    def test_an_unknown_on_timeout_is_refused(self) -> None:
        with pytest.raises(ValueError, match="proceed, wait"):
            approval.pause_plan(1800, "maybe", 7200)


class TestDecide:
    proceed = approval.pause_plan(30, "proceed", 7200)
    wait = approval.pause_plan(30, "wait", 7200)

    def test_an_approval_proceeds_and_records_who(self) -> None:
        got = approval.decide(Answer(True, "alice", "checked the crash logs"), self.wait, 1)
        assert (got.action, got.step, got.ok) == (PROCEED, "approval", True)
        assert got.detail == "rollback approved by alice: checked the crash logs"

    def test_a_rejection_stops_it_whatever_on_timeout_says(self) -> None:
        for plan in (self.proceed, self.wait):
            got = approval.decide(Answer(False, " bob ", " found the bug "), plan, 1)
            assert (got.action, got.step) == (REJECT, "approval")
            assert got.detail == "rollback rejected by bob: found the bug"

    def test_an_answer_with_no_name_or_note_says_so(self) -> None:
        got = approval.decide(Answer(False, "  "), self.proceed, 1)
        assert got.detail == "rollback rejected by someone who gave no name"

    def test_no_decision_with_proceed_goes_on_as_the_automatic_last_resort(self) -> None:
        got = approval.decide(None, self.proceed, 1)
        assert (got.action, got.step) == (PROCEED, "approval-timeout")
        assert got.detail == "no decision within 30 s: proceeding as the runbook's automatic last resort"

    def test_no_decision_with_wait_asks_again_until_the_last_ask(self) -> None:
        for asked in range(1, self.wait.asks):
            got = approval.decide(None, self.wait, asked)
            assert (got.action, got.ok) == (ASK_AGAIN, False)
            assert f"(ask {asked} of {self.wait.asks}): L3 paged again, still waiting" in got.detail

    def test_no_decision_after_the_last_ask_gives_up_without_restoring(self) -> None:
        got = approval.decide(None, self.wait, self.wait.asks)
        assert (got.action, got.ok) == (GIVE_UP, False)
        assert got.detail == ("rollback not approved: no decision after 4 ask(s) of 30 s "
                              "(rollback_on_timeout=wait never rolls back alone)")


class TestRequestText:
    def plan(self, tmp_path: Path, db: Path) -> approval.RollbackPlan:
        backup.create(db, tmp_path / "backups", now=NOW - timedelta(days=2))
        plan = approval.plan_rollback(tmp_path / "backups", 48, tmp_path / "q", NOW_MS)
        assert plan is not None
        return plan

    def test_it_says_what_is_restored_what_is_lost_where_to_decide_and_what_no_decision_does(
        self, tmp_path: Path, db: Path
    ) -> None:
        text = approval.request_text(self.plan(tmp_path, db), approval.pause_plan(1800, "proceed", 7200), 1,
                                     "http://ui/runs/flow-run/x")
        assert "would restore db_backup_20260313.db (taken 2026-03-13T12:00:00Z, 48.0 h ago)" in text
        assert "the 48.0 h of data newer than it are replaced" in text
        assert "Approve or reject it in the Prefect UI: http://ui/runs/flow-run/x" in text
        assert "Without a decision within 1800 s the rollback proceeds on its own" in text

    def test_waiting_it_counts_the_asks_and_warns_at_the_last(self, tmp_path: Path, db: Path) -> None:
        plan, pauses = self.plan(tmp_path, db), approval.pause_plan(1800, "wait", 7200)
        assert "L3 is asked again (ask 1 of 4); nothing is restored without a decision" in approval.request_text(
            plan, pauses, 1, "link")
        assert "This is the last ask (4 of 4)" in approval.request_text(plan, pauses, 4, "link")
