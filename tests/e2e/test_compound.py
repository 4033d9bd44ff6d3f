"""Faults that compound, on a rehearsal stack of its own as `crypto-agent up` starts it, and what the automations
alone do about them, counting the pages a person would get: the daemon killed again right after its restart; the
trader killed (the backtest yields until the trader is HEALTHY, then resumes); a stale store the recovery cannot
fix (the exchange is down): one incident, a bounded number of pages over many monitor rounds, then it clears;
memory growth past the limit; pages of the store corrupted with no backup at all (rebuilt, the trader back first,
LOCKED released); the stack stopped in the middle of a recovery, started again, then a crash (recovered: nothing
waits for a slot the cancelled run held).

The tests share one stack and run in file order; every wait is bounded, none is a timed assertion.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from crypto_agent import faults, health, process
from crypto_agent.incidents import Incident
from crypto_agent.quality import check_data
from crypto_agent.service import read_heartbeat
from crypto_agent.store import Store
from crypto_agent.storelock import is_locked
from flows.events import BACKTEST_DAEMON_RESOURCE
from tests.stack_kit import REHEARSAL_DEPLOYMENTS, RunningStack, run_cli, start_rehearsal

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECOVERY_S = 180.0  # generous bounds: a recovery here takes seconds
RSS_MAX_MB = 400.0  # the module's memory limit: the services idle well under it, the growing daemon passes it
MONITOR_ROUNDS = 5  # rounds of the health monitor over an unfixable condition (every 5 min: 25 min of a desk)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A rehearsal stack of this module: more crashes than the rollback rule's 3 happen here on purpose."""
    running = start_rehearsal(tmp_path_factory.mktemp("compound"),
                              settings={"persistent_failures": 10, "rss_max_mb": RSS_MAX_MB})
    try:
        yield running
    finally:
        running.close()


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def subjects(stack: RunningStack, level: str, since: str) -> list[str]:
    return [m["body"]["subject"] for m in stack.messages(level, since)]


def every_page(stack: RunningStack, since: str) -> dict[str, list[str]]:
    return {level: subjects(stack, level, since) for level in ("l1", "l2", "l3")}


def since_incidents(stack: RunningStack, scenario: str, after_ms: int, resource: str | None = None) -> list[Incident]:
    """The scenario's incidents (of `resource`, when given) opened since `after_ms`, oldest first."""
    return sorted((i for i in stack.incidents() if i.scenario == scenario and i.opened_at >= after_ms
                   and (resource is None or i.resource == resource)), key=lambda i: i.id)


def runs_ended(stack: RunningStack, flow_name: str) -> bool:
    return all(r.state_type.value in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
               for r in stack.flow_runs(flow_name))


def fresh(stack: RunningStack) -> bool:
    with Store(stack.settings.database_url) as store:
        return check_data(store, stack.settings).ok


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.mark.timeout(500)
def test_a_daemon_killed_again_right_after_its_restart_is_restarted_again(stack: RunningStack) -> None:
    since, since_iso = now_ms(), now_iso()
    first = faults.kill(stack.settings, "backtest", signal.SIGKILL).pid
    second = stack.wait(lambda: stack.healthy_other_than("backtest", first), RECOVERY_S, "the first restart").pid
    faults.kill(stack.settings, "backtest", signal.SIGKILL)  # the fresh instance dies at once
    third = stack.wait(lambda: stack.healthy_other_than("backtest", second), RECOVERY_S, "the second restart").pid
    assert third not in (first, second)
    stack.wait(lambda: runs_ended(stack, "recover-daemon-crash"), RECOVERY_S, "the crash recoveries to end")
    crashes = since_incidents(stack, "daemon-crash", since, BACKTEST_DAEMON_RESOURCE)
    assert crashes and all(i.outcome == "recovered" for i in crashes), [(i.id, i.outcome) for i in crashes]
    # two shapes, by timing: the second kill after the first incident closed opens a second incident; a kill
    # before the first recovery's own confirm-healthy saw the new instance is that incident's "crashed-again".
    # Either way the restart policy counted it as the loop's 2nd crash.
    if len(crashes) == 2:
        second_crash = next(a["detail"] for a in crashes[1].actions if a["step"] == "restart-policy")
    else:
        assert len(crashes) == 1, [(i.id, i.outcome) for i in crashes]
        second_crash = next(a["detail"] for a in crashes[0].actions if a["step"] == "crashed-again")
    assert "2nd crash" in second_crash, second_crash
    pages = every_page(stack, since_iso)
    assert pages["l3"] == [] and not [s for s in pages["l2"] if "daemon" in s.lower()], pages
    # one page for the crash that came back: its opening grouped with the first incident (page_group_window_s)
    l1 = [s for s in pages["l1"] if any(f"incident #{i.id} " in s for i in crashes)]
    if len(crashes) == 2:
        assert "page-grouped" in [a["step"] for a in crashes[1].actions], crashes[1].actions
        assert len(l1) == 3 and f"(again, after incident #{crashes[0].id})" in l1[-1], l1
    else:
        assert len(l1) == 2, l1
    assert stack.probe("trader").healthy


@pytest.mark.timeout(500)
def test_the_trader_killed_pauses_the_backtest_until_it_is_healthy_again(stack: RunningStack) -> None:
    since, since_iso = now_ms(), now_iso()
    daemon = stack.pid("backtest")
    log = process.service_spec("backtest", stack.settings).log
    seen = len(log.read_text(encoding="utf-8").splitlines())
    old = faults.kill(stack.settings, "trader", signal.SIGKILL).pid
    stack.wait(lambda: stack.healthy_other_than("trader", old), RECOVERY_S, "the trader back HEALTHY")
    [inc] = stack.wait(lambda: [i for i in since_incidents(stack, "daemon-crash", since) if not i.is_open],
                       RECOVERY_S, "the trader's incident to close")
    done = [a["step"] for a in inc.actions]
    assert done.index("pause-backtest") < done.index("start") < done.index("resume-backtest"), done
    # the daemon itself yielded (its own pause, not a signal) and resumed (it looks every second): the same
    # process says so in its log
    def said(words: str) -> list[int]:
        lines = log.read_text(encoding="utf-8").splitlines()[seen:]
        return [i for i, line in enumerate(lines) if f"[{daemon}]" in line and words in line]

    paused = [i for i in said("new work paused") if i in said(f"incident #{inc.id}")]
    resumed = stack.wait(lambda: said("work resumed"), 30, "the daemon to say it resumed")
    assert paused and paused[0] < resumed[-1], log.read_text(encoding="utf-8").splitlines()[seen:][-20:]
    assert stack.pid("backtest") == daemon
    stack.wait(lambda: (b := read_heartbeat(process.service_spec("backtest", stack.settings).heartbeat))
               is not None and not (b.state or "").startswith("paused"), 60, "the backtest to resume")
    # live trading was affected: L3 is told at the close, just after the incident is marked closed
    stack.wait(lambda: any(f"incident #{inc.id}" in s for s in subjects(stack, "l3", since_iso)), 60,
               f"L3 to be told of incident #{inc.id}")


@pytest.mark.timeout(900)
def test_a_stale_store_nothing_can_fix_is_one_incident_paged_once_until_it_clears(stack: RunningStack) -> None:
    since, since_iso = now_ms(), now_iso()
    faults.exchange(stack.settings, "down")  # the exchange answers 503: no backfill can succeed
    faults.delete_candles(stack.settings, stack.settings.symbols, hours=30)
    try:
        for _ in range(MONITOR_ROUNDS):
            stack.run_monitor(wait_s=RECOVERY_S)
            stack.wait(lambda: runs_ended(stack, "recover-stale-data"), RECOVERY_S, "the stale-data recovery to end")
        stale = since_incidents(stack, "stale-data", since)
        assert len(stale) == 1 and stale[0].needs_person, [(i.id, i.status, i.outcome) for i in stale]
        pages = every_page(stack, since_iso)
        tag = f"incident #{stale[0].id} "
        mine = {level: [s for s in got if tag in s] for level, got in pages.items()}
        # the incident opened and closed escalated (L1), escalated to a person (L2, "check Binance API"); never
        # once per round; and no other incident was opened for it (a late page of the previous test may arrive)
        assert len(mine["l1"]) <= 2 and len(mine["l2"]) <= 1 and mine["l3"] == [], pages
        assert not [s for got in pages.values() for s in got if " opened: " in s and tag not in s], pages
    finally:
        faults.clear_exchange(stack.settings)
    stack.run_monitor(wait_s=RECOVERY_S)
    stack.wait(lambda: fresh(stack), RECOVERY_S, "the store fresh again once the exchange is back")
    stack.wait(lambda: not since_incidents(stack, "stale-data", since)[0].is_open, RECOVERY_S,
               "the needs-a-person incident to close")


@pytest.mark.timeout(500)
def test_memory_growing_past_the_limit_is_restarted_by_the_hang_recovery(stack: RunningStack) -> None:
    since = now_ms()
    grown = faults.grow_memory(stack.settings, mb_per_s=100.0, max_mb=RSS_MAX_MB * 2).pid
    stack.wait(lambda: (p := stack.probe("backtest")).rss_mb is not None and p.rss_mb > RSS_MAX_MB, 60,
               "the daemon to grow past the limit")
    stack.run_monitor()
    back = stack.wait(lambda: stack.healthy_other_than("backtest", grown), RECOVERY_S, "a new daemon HEALTHY")
    assert back is not None and back.rss_mb is not None and back.rss_mb < RSS_MAX_MB
    [hang] = stack.wait(lambda: [i for i in since_incidents(stack, "process-hang", since) if not i.is_open],
                        RECOVERY_S, "the hang incident to close")
    assert hang.trigger["event"] == "crypto-agent.service.memory-high" and hang.outcome == "recovered"
    assert faults.fault_of(stack.settings) is None  # restarted clean, without the fault


@pytest.mark.timeout(500)
def test_results_gone_stale_under_a_beating_heart_are_triaged_by_the_hang_recovery(stack: RunningStack) -> None:
    """A daemon that beats but writes no result (spinning in its loop) is found by the monitor's "results
    stale" check (the limit shortened for this round from the runbook's 2 h) and restarted clean."""
    since = now_ms()
    spinning = faults.burn_cpu(stack.settings)
    max_age_s = 5.0

    def newest_result_age() -> float:
        with Store(stack.settings.database_url) as store:
            newest = health.newest_backtest_result_at(store)
        return float("inf") if newest is None else time.time() - newest
    stack.wait(lambda: newest_result_age() > max_age_s + 1 and time.time() - spinning.at > max_age_s + 1, 60,
               "the newest backtest result to age past the limit")
    assert stack.probe("backtest").alive and stack.pid("backtest") == spinning.pid  # beating, not dead
    stack.run_monitor(parameters={"settings": {"backtest_results_max_age_s": max_age_s}})
    [hang] = stack.wait(lambda: [i for i in since_incidents(stack, "process-hang", since) if not i.is_open],
                        RECOVERY_S, "the hang incident to close")
    assert hang.trigger["event"] == "crypto-agent.service.results-stale" and hang.outcome == "recovered", hang
    assert any(a["step"] == "capture-stacks" and a["ok"] for a in hang.actions), hang.actions
    assert stack.healthy_other_than("backtest", spinning.pid) is not None
    assert faults.fault_of(stack.settings) is None  # restarted clean, without the fault
    stack.wait(lambda: newest_result_age() < max_age_s, 120, "new backtest results from the restarted daemon")


@pytest.mark.timeout(600)
def test_corrupt_pages_with_no_backup_are_rebuilt_and_the_trader_comes_back_first(stack: RunningStack) -> None:
    since, since_iso = now_ms(), now_iso()
    settings = stack.settings
    # a stack younger than its first nightly backup, its replica lost too (a replica wiped restores nothing)
    for path in [*settings.backup_dir.glob("*"), settings.replica_dir]:
        if path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    with Store(settings.database_url) as store:
        candles_before = store.count("1h")
    faults.corrupt_pages(settings, "ohlcv_h1", pages=2)
    stack.run_monitor()  # or the services meet the damage first and say so: either starts the recovery
    [inc] = stack.wait(lambda: [i for i in since_incidents(stack, "db-corruption", since) if not i.is_open],
                       RECOVERY_S * 2, "the corruption incident to close")
    assert inc.outcome == "recovered", (inc.outcome, inc.summary)
    done = [a["step"] for a in inc.actions]
    assert "rebuild" in " ".join(done), done
    assert stack.integrity_ok() and not is_locked(settings.db_path)
    assert stack.wait(lambda: stack.probe("trader").healthy, RECOVERY_S, "the trader HEALTHY")
    stack.wait(lambda: fresh(stack), RECOVERY_S, "the candles back from the exchange")
    with Store(settings.database_url) as store:
        assert store.count("1h") >= candles_before * 0.99
    stack.wait(lambda: any("rebuilt" in s.lower() or f"incident #{inc.id}" in s
                           for s in subjects(stack, "l2", since_iso)), 60, f"L2 to be told of incident #{inc.id}")
    # one cause, one problem paged (issue 11): a service that died of the damage is linked to this incident
    assert [i.id for i in since_incidents(stack, "db-corruption", since)] == [inc.id]
    handed = [c for c in since_incidents(stack, "daemon-crash", since) if "handed over to incident" in c.summary]
    for crash in handed:
        assert "page-inhibited" in [a["step"] for a in crash.actions], crash.actions
        assert not [s for got in every_page(stack, since_iso).values() for s in got
                    if f"incident #{crash.id} " in s and " opened: " not in s], every_page(stack, since_iso)


@pytest.mark.timeout(900)
def test_the_stack_stopped_mid_recovery_then_started_again_recovers_the_next_crash(stack: RunningStack) -> None:
    faults.exchange(stack.settings, "slow", seconds=3.0)  # the backfill of the stale-data recovery takes a while
    faults.delete_candles(stack.settings, stack.settings.symbols, hours=30)
    stack.run_monitor()

    def running() -> bool:
        return any(r.state_type.value == "RUNNING" for r in stack.flow_runs("recover-stale-data"))

    stack.wait(running, RECOVERY_S, "a stale-data recovery running")
    since_iso = now_iso()
    down = run_cli(["down"], stack.env, 300, cwd=stack.home)
    assert down.returncode == 0, down.stdout + down.stderr
    args = ["up", "--detach", "--no-ui", *[a for name in REHEARSAL_DEPLOYMENTS for a in ("--only", name)]]
    up = run_cli(args, stack.env, 300, cwd=stack.home)
    assert up.returncode == 0, up.stdout + up.stderr
    since = now_ms()
    old = faults.kill(stack.settings, "backtest", signal.SIGKILL).pid
    back = stack.wait(lambda: stack.healthy_other_than("backtest", old), RECOVERY_S, "the daemon back HEALTHY")
    assert back is not None and back.pid != old
    [crash] = stack.wait(lambda: [i for i in since_incidents(stack, "daemon-crash", since, BACKTEST_DAEMON_RESOURCE)
                                  if not i.is_open],
                         RECOVERY_S, "the crash incident to close")
    assert crash.outcome == "recovered" and "waiting" not in [a["step"] for a in crash.actions]
    stack.run_monitor(wait_s=RECOVERY_S)
    stack.wait(lambda: fresh(stack), RECOVERY_S * 2, "the store fresh again")
    # an operator's down and up is no outage of monitoring: no dead man's switch fired meanwhile
    assert not [s for s in subjects(stack, "l2", since_iso) if "silent" in s], subjects(stack, "l2", since_iso)
