"""Paging as on-call tools do it (issue 11), without Prefect: the ack clock's decision, acknowledgements and MTTA,
silences (match, hold, summary), the report's Owner and Prevention, and their commands on a real incident log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_kit import run_cli

from crypto_agent import incidents
from crypto_agent.errors import InputError
from crypto_agent.incidents import ESCALATED, RESOLVED, silences
from crypto_agent.incidents.report import prevention_item
from crypto_agent.settings import Settings, load_settings
from crypto_agent.store import Store

T0 = 1_800_000_000.0  # a fixed instant (seconds): times below are offsets from it
TRADER = "crypto-agent.service.paper-trader"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(home=tmp_path)


@pytest.fixture
def log(settings: Settings):
    store = incidents.open_incident_store(settings)
    yield store
    store.close()


def paged_incident(log: Store, *levels: str, at: float = T0, needs_person: bool = True,
                   resource: str = TRADER) -> incidents.Incident:
    """An incident closed escalated (it needs a person) after paging `levels` at `at`."""
    inc, _ = incidents.open_or_join(log, "daemon-crash", resource, {}, at, now=at)
    for level in levels:
        incidents.told(log, inc.id, level, now=at)
    status = ESCALATED if needs_person else RESOLVED
    incidents.close(log, inc.id, status, outcome="escalated" if needs_person else "recovered",
                    summary="restart failed 3 times", now=at + 1)
    return incidents.get(log, inc.id)


class TestTheAckClock:
    def test_told_records_the_first_page_and_the_highest_level_reached(self, log: Store) -> None:
        inc, _ = incidents.open_or_join(log, "daemon-crash", TRADER, {}, T0, now=T0)
        incidents.told(log, inc.id, "l1", now=T0)
        incidents.told(log, inc.id, "l2", now=T0 + 5)
        incidents.told(log, inc.id, "l1", now=T0 + 9)  # a later L1 message does not lower the level
        got = incidents.get(log, inc.id)
        assert got.first_paged_at == int(T0 * 1000) and got.last_paged_at == int((T0 + 9) * 1000)
        assert got.paged_level == "l2" and got.paged_level_at == int((T0 + 5) * 1000)

    def test_an_unacknowledged_page_climbs_one_level_per_timeout_up_to_l3(self, log: Store) -> None:
        inc = paged_incident(log, "l1")
        ms = int(T0 * 1000)
        assert incidents.ack_climb(inc, ms + 899_000, 900) is None  # 14:59 after: not yet
        climb = incidents.ack_climb(inc, ms + 900_000, 900)
        assert climb is not None and climb.level == "l2"
        assert f"crypto-agent ack {inc.id}" in climb.why and "15 min" in climb.why
        incidents.told(log, inc.id, "l2", now=T0 + 900)
        inc = incidents.get(log, inc.id)
        assert incidents.ack_climb(inc, ms + 1_700_000, 900) is None  # the clock restarts at L2
        climb = incidents.ack_climb(inc, ms + 1_800_000, 900)
        assert climb is not None and climb.level == "l3"
        incidents.told(log, inc.id, "l3", now=T0 + 1800)
        assert incidents.ack_climb(incidents.get(log, inc.id), ms + 99_000_000, 900) is None  # L3 is the top

    def test_an_acknowledged_or_resolved_incident_does_not_climb(self, log: Store) -> None:
        acked = paged_incident(log, "l1")
        incidents.acknowledge(log, acked.id, by="alice", now=T0 + 60)
        resolved = paged_incident(log, "l1", needs_person=False, resource="crypto-agent.service.backtest-daemon")
        late = int((T0 + 3600) * 1000)
        assert incidents.ack_climb(incidents.get(log, acked.id), late, 900) is None
        assert incidents.ack_climb(resolved, late, 900) is None
        assert [i.id for i in incidents.awaiting_ack(log)] == []

    def test_acknowledge_counts_mtta_from_the_first_page_once(self, log: Store) -> None:
        inc = paged_incident(log, "l1", "l2")
        done = incidents.acknowledge(log, inc.id, by="alice", note="on it", now=T0 + 240)
        assert done.acked_by == "alice" and done.ack_s == 240.0
        assert done.actions[-1]["step"] == "acknowledged" and "alice: on it" in done.actions[-1]["detail"]
        again = incidents.acknowledge(log, inc.id, by="bob", now=T0 + 900)
        assert again.acked_by == "alice" and again.ack_s == 240.0  # the first acknowledgement stays
        [stats] = [s for s in incidents.mttr_by_scenario(log) if s.scenario == "daemon-crash"]
        assert stats.acked == 1 and stats.mtta_s == 240.0
        report = incidents.render_report(incidents.get(log, inc.id))
        assert "by alice at 2027-01-15T08:04:00Z (time to acknowledge 4.0 min)" in report

    def test_an_incident_that_does_not_exist_cannot_be_acknowledged(self, log: Store) -> None:
        with pytest.raises(incidents.IncidentError, match="#99"):
            incidents.acknowledge(log, 99, by="alice")


class TestSilences:
    @pytest.mark.parametrize(("pattern", "resource", "held"), [
        ("trader", TRADER, True),
        ("paper-trader", TRADER, True),
        ("crypto-agent.service.*", TRADER, True),
        (TRADER, TRADER, True),
        ("backtest", TRADER, False),
        ("store", "crypto-agent.store.main", True),
        ("backtest", "log-errors:backtest", True),
        ("trade", TRADER, False),  # a part of a word is not a name
    ])
    def test_a_silence_matches_a_resource_by_id_glob_or_name(self, pattern: str, resource: str, held: bool) -> None:
        assert silences.matches(pattern, resource) is held

    @pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400),
                                                   ("30", 30), ("1.5h", 5400)])
    def test_durations_read_as_operators_write_them(self, text: str, seconds: float) -> None:
        assert silences.parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["", "2y", "-5m", "0s", "31d", "soon"])
    def test_a_bad_duration_says_how_to_write_one(self, text: str) -> None:
        with pytest.raises(InputError) as err:
            silences.parse_duration(text)
        assert err.value.hint

    def test_a_silence_holds_pages_while_in_force_and_summarizes_them_once_after(self, log: Store) -> None:
        s = silences.add(log, "trader", 3600, "exchange maintenance", by="alice", now=T0)
        assert silences.silencing(log, TRADER, now=T0 + 10).id == s.id
        assert silences.silencing(log, "crypto-agent.service.backtest-daemon", now=T0 + 10) is None
        assert silences.silencing(log, TRADER, now=T0 + 3600) is None  # it ended
        silences.hold(log, s.id, resource=TRADER, level="l1", subject="incident #4 opened", incident_id=4, now=T0 + 5)
        silences.hold(log, s.id, resource=TRADER, level="l2", subject="incident #4 escalated", incident_id=4)
        assert silences.ended_unsummarized(log, now=T0 + 100) == []
        silences.expire(log, s.id, now=T0 + 100)
        [ended] = silences.ended_unsummarized(log, now=T0 + 101)
        messages = silences.summary_messages(ended)
        assert sorted(messages) == ["l1", "l2"]
        subject, body = messages["l1"]
        assert f"silence #{s.id} (trader) ended: it held 1 page for L1" in subject
        assert "exchange maintenance" in body and "incident #4 opened" in body
        assert silences.claim_summary(log, s.id) and not silences.claim_summary(log, s.id)
        assert silences.ended_unsummarized(log, now=T0 + 200) == []

    def test_a_silence_needs_a_resource_and_a_reason(self, log: Store) -> None:
        with pytest.raises(InputError, match="reason"):
            silences.add(log, "trader", 60, "  ", by="alice")
        with pytest.raises(InputError, match="resource"):
            silences.add(log, "", 60, "why", by="alice")
        assert silences.list_silences(log) == []


class TestCloseTheReport:
    @pytest.mark.parametrize(("text", "item"), [
        ("auto-restart", "Auto-restart added"), ("Backup validation", "Backup validation improved"),
        ("monitoring threshold", "Monitoring threshold adjusted"), ("alert on WAL size", "Other: alert on WAL size"),
    ])
    def test_prevention_items_are_the_runbooks_or_other(self, text: str, item: str) -> None:
        assert prevention_item(text) == item

    def test_owner_and_prevention_fill_the_report(self, log: Store) -> None:
        inc = paged_incident(log, "l1")
        filled = incidents.set_report_fields(log, inc.id, owner="alice", due="2027-01-04",
                                             prevention=["Auto-restart added", "Other: alert on WAL size"])
        report = incidents.render_report(filled)
        assert "[x] Auto-restart added" in report and "[ ] Backup validation improved" in report
        assert "[x] Other: alert on WAL size" in report and "Owner: alice | Due: 2027-01-04" in report
        assert [i.id for i in incidents.reports_to_publish(log)] == []  # no report_md to publish yet
        incidents.set_report_fields(log, inc.id, owner="alice", prevention=["Auto-restart added"], report_md=report)
        assert [i.id for i in incidents.reports_to_publish(log)] == [inc.id]

    def test_an_open_incident_report_cannot_be_closed(self, log: Store) -> None:
        inc, _ = incidents.open_or_join(log, "daemon-crash", TRADER, {}, T0)
        with pytest.raises(InputError, match="open"):
            incidents.set_report_fields(log, inc.id, owner="alice", prevention=["x"])


class TestTheCommands:
    def test_ack_then_list_shows_who_and_the_mtta(self, settings: Settings, log: Store) -> None:
        inc = paged_incident(log, "l1")
        done = run_cli(["ack", str(inc.id), "--by", "alice", "--note", "looking"], settings)
        assert done.returncode == 0, done.stderr
        assert f"incident #{inc.id}" in done.stdout and "acknowledged by alice" in done.stdout
        again = run_cli(["ack", str(inc.id), "--by", "bob"], settings)
        assert again.returncode == 0 and "already acknowledged by alice" in again.stdout
        listed = run_cli(["incidents", "--json"], settings)
        [row] = json.loads(listed.stdout)["incidents"]
        assert row["acked_by"] == "alice" and row["acked_at"] is not None
        table = run_cli(["incidents"], settings)
        assert "MTTA" in table.stdout and "acked by alice" in table.stdout

    def test_ack_of_an_unknown_incident_is_a_clear_error_that_writes_nothing(self, settings: Settings) -> None:
        got = run_cli(["ack", "42"], settings)
        assert got.returncode != 0 and "no incident #42" in got.stderr and "Traceback" not in got.stderr
        assert not incidents.incidents_db_path(settings).exists()

    def test_silence_start_list_expire(self, settings: Settings) -> None:
        started = run_cli(["silence", "--resource", "trader", "--for", "2h", "--reason", "disk swap",
                           "--by", "alice"], settings)
        assert started.returncode == 0, started.stderr
        assert "silence #1" in started.stdout and "crypto-agent silence expire 1" in started.stdout
        listed = run_cli(["silence", "list", "--json"], settings)
        [s] = json.loads(listed.stdout)
        assert s["pattern"] == "trader" and s["reason"] == "disk swap" and s["created_by"] == "alice"
        assert run_cli(["silence", "expire", "1"], settings).returncode == 0
        assert json.loads(run_cli(["silence", "list", "--json"], settings).stdout) == []
        assert len(json.loads(run_cli(["silence", "list", "--all", "--json"], settings).stdout)) == 1

    @pytest.mark.parametrize("args", [
        ["silence", "--resource", "trader", "--for", "2y", "--reason", "x"],
        ["silence", "--resource", "trader", "--for", "2h"],
        ["silence"],
        ["silence", "expire", "9"],
    ])
    def test_a_bad_silence_says_what_to_do_and_silences_nothing(self, settings: Settings, args: list[str]) -> None:
        got = run_cli(args, settings)
        assert got.returncode != 0 and "error:" in got.stderr and "Traceback" not in got.stderr
        listed = run_cli(["silence", "list", "--all", "--json"], settings)
        assert json.loads(listed.stdout) == []

    def test_close_report_fills_owner_and_prevention(self, settings: Settings, log: Store) -> None:
        inc = paged_incident(log, "l1")
        done = run_cli(["incidents", "close-report", str(inc.id), "--owner", "alice", "--prevention",
                        "auto-restart", "--prevention", "alert on WAL size"], settings)
        assert done.returncode == 0, done.stderr
        report = run_cli(["incidents", "--report", str(inc.id)], settings).stdout
        assert "[x] Auto-restart added" in report and "[x] Other: alert on WAL size" in report
        assert "Owner: alice" in report
        bad = run_cli(["incidents", "close-report", str(inc.id), "--owner", "bob", "--prevention", "x",
                       "--due", "next week"], settings)
        assert bad.returncode != 0 and "YYYY-MM-DD" in bad.stderr
        assert incidents.get(log, inc.id).report_owner == "alice"  # the bad call wrote nothing


class TestMissedDay:
    @pytest.mark.parametrize(("crons", "daily"), [
        (["30 0 * * *"], True), (["0 3 * * 0"], False), (["*/5 * * * *"], False), (["15 * * * *"], False),
        (["0 4 1-7 * 0"], False), (["30 0 * * *", "0 1 * * *"], False), ([], False),
    ])
    def test_only_once_a_day_jobs_can_miss_their_day(self, crons: list[str], daily: bool) -> None:
        from crypto_agent.alerts import is_daily

        assert is_daily(crons) is daily

    def test_a_daily_job_silent_for_a_day_and_the_grace_pages_l2(self) -> None:
        from crypto_agent.alerts import MISSED_DAY_GRACE_S, missed_day

        day = 86400 + MISSED_DAY_GRACE_S
        assert missed_day("data-update/daily", ["30 0 * * *"], T0 - day + 60, T0 - 9 * 86400, T0) is None
        alert = missed_day("data-update/daily", ["30 0 * * *"], T0 - day - 60, T0 - 9 * 86400, T0)
        assert alert is not None and alert.level == "l2" and "missed its day" in alert.subject
        assert "no completed run for 26 h" in alert.subject and "prefect deployment run" in alert.body
        never = missed_day("data-update/daily", ["30 0 * * *"], None, T0 - day - 1, T0)
        assert never is not None and "last completed: never" in never.body
        assert missed_day("compact/weekly", ["0 3 * * 0"], None, T0 - 30 * 86400, T0) is None
