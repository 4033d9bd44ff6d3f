"""Paging on a rehearsal stack of its own, as `crypto-agent up` starts it with page-clock and acknowledge served
(issue 11): a stale store nothing can fix (the exchange down) is one incident; acknowledged with
`prefect deployment run acknowledge/ui`, its page does not climb; resolved by a person and detected again,
the new incident, unacknowledged, climbs to L3 at the configured ack timeout on page-clock's own schedule; a
silence started with `crypto-agent silence` holds a recovery's pages, which are told once after it ends.

Every wait is bounded; the negative check (no climb once acknowledged) waits out two page-clock rounds past
the timeout. Messages are counted at the stack's receiver.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from crypto_agent import faults
from crypto_agent.incidents import Incident
from tests.stack_kit import PREFECT, RunningStack, api, run_cli, start_rehearsal

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ACK_TIMEOUT_S = 20.0
PAGE_CLOCK = "page-clock/every-minute"
ROUND_S = 60.0  # page-clock's cron
RECOVERY_S = 180.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_rehearsal(tmp_path_factory.mktemp("paging"), settings={"ack_timeout_s": ACK_TIMEOUT_S},
                              also_serve=(PAGE_CLOCK, "acknowledge/ui"))
    try:
        yield running
    finally:
        running.close()


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def pages_of(stack: RunningStack, inc: Incident, level: str, since: str) -> list[str]:
    return [m["body"]["subject"] for m in stack.messages(level, since) if f"incident #{inc.id} " in
            m["body"]["subject"]]


def completed_runs(stack: RunningStack, flow_name: str) -> int:
    """How many runs of the flow completed (its scheduled ones, an hour ahead, are not counted)."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with api(stack) as client:
        return len(client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.COMPLETED]))), limit=200))


def told(stack: RunningStack, incident_id: int, level: str) -> Incident | None:
    """The incident once `level` was told about it, else None."""
    inc = next(i for i in stack.incidents() if i.id == incident_id)
    return inc if level in inc.levels_told else None


def escalated_stale(stack: RunningStack, after_ms: int) -> Incident:
    """Run the monitor over the stale store until the stale-data recovery closes its incident needing a person."""
    def waiting() -> Incident | None:
        return next((i for i in stack.incidents() if i.scenario == "stale-data" and i.needs_person
                     and not i.is_open and (i.rejoined_at or i.opened_at) >= after_ms), None)

    stack.run_monitor(wait_s=RECOVERY_S)
    return stack.wait(waiting, RECOVERY_S, "the stale-data incident to need a person")


@pytest.mark.timeout(1200)
def test_an_acknowledged_page_stays_put_and_an_unacknowledged_one_climbs_to_l3(stack: RunningStack) -> None:
    since_iso, since = now_iso(), int(time.time() * 1000)
    faults.exchange(stack.settings, "down")
    faults.delete_candles(stack.settings, stack.settings.symbols, hours=30)
    try:
        opened = escalated_stale(stack, since).id
        # closed escalated, then paged: L1 and L2 at the close
        first = stack.wait(lambda: told(stack, opened, "l2"), 60, "L2 to be told at the close")
        acked = subprocess.run([PREFECT, "deployment", "run", "acknowledge/ui", "-p", f"incident_id={first.id}",
                                "-p", "by=alice"], env=stack.prefect_env(), capture_output=True, text=True,
                               timeout=120, check=False, stdin=subprocess.DEVNULL)
        assert acked.returncode == 0, acked.stdout + acked.stderr
        stack.wait(lambda: next(i for i in stack.incidents() if i.id == first.id).acked_by == "alice", 60,
                   "the acknowledge run to record alice")
        time.sleep(ACK_TIMEOUT_S + 2 * ROUND_S)  # two page-clock rounds past the timeout: nothing climbs
        assert pages_of(stack, first, "l3", since_iso) == [], stack.messages("l3", since_iso)
        assert completed_runs(stack, "page-clock") >= 2, "page-clock did not run on its schedule"

        # fixed by a person (the exchange is still down): the next detection is a new incident, nobody acks it
        resolved = run_cli(["incidents", "--resolve", str(first.id), "--note", "looked at it"], stack.env, 60)
        assert resolved.returncode == 0, resolved.stderr
        again = time.time()
        second = escalated_stale(stack, int(again * 1000))
        stack.wait(lambda: told(stack, second.id, "l2"), 60, "L2 to be told at the close")
        assert second.id != first.id
        stack.wait(lambda: pages_of(stack, second, "l3", since_iso), ACK_TIMEOUT_S + 2 * ROUND_S + 30,
                   f"incident #{second.id}'s page to climb to L3")
        [l3] = pages_of(stack, second, "l3", since_iso)
        assert "unacknowledged, escalated to L3" in l3
        climbed = stack.wait(lambda: told(stack, second.id, "l3"), 30, "the climb recorded in the incident")
        assert climbed.levels_told == ["l1", "l2", "l3"] and climbed.acked_at is None
        # one page per level for it: L1 opened and closed, L2 at the close, L3 by the clock
        assert len(pages_of(stack, second, "l2", since_iso)) == 1 and len(pages_of(stack, second, "l1", since_iso)) == 2
    finally:
        faults.clear_exchange(stack.settings)


@pytest.mark.timeout(900)
def test_a_silence_holds_a_recoverys_pages_and_tells_them_once_after_it_ends(stack: RunningStack) -> None:
    silenced = run_cli(["silence", "--resource", "store", "--for", "30m", "--reason", "exchange maintenance",
                        "--by", "alice"], stack.env, 60)
    assert silenced.returncode == 0, silenced.stderr
    silence_id = int(silenced.stdout.split("#", 1)[1].split(":", 1)[0])
    for inc in stack.incidents():  # whatever an earlier test left waiting for a person
        if inc.needs_person and not inc.is_open:
            run_cli(["incidents", "--resolve", str(inc.id)], stack.env, 60)
    since_iso, since = now_iso(), int(time.time() * 1000)
    faults.exchange(stack.settings, "down")
    faults.delete_candles(stack.settings, stack.settings.symbols, hours=30)
    try:
        inc = escalated_stale(stack, since)
    finally:
        faults.clear_exchange(stack.settings)
    time.sleep(5)
    assert [m for m in stack.messages(None, since_iso) if f"incident #{inc.id} " in m["body"]["subject"]] == []
    listed = run_cli(["silence", "list"], stack.env, 60)
    assert f"#{silence_id} 'store'" in listed.stdout and "page(s) held" in listed.stdout
    assert "0 page(s) held" not in listed.stdout
    assert run_cli(["silence", "expire", str(silence_id)], stack.env, 60).returncode == 0
    told = stack.wait(lambda: [m for m in stack.messages("l1", since_iso)
                               if f"silence #{silence_id} (store) ended" in m["body"]["subject"]],
                      ROUND_S + 60, "page-clock to tell L1 what the silence held")
    assert len(told) == 1 and f"incident #{inc.id}" in told[0]["body"]["body"]
    time.sleep(ROUND_S + 5)  # the next round does not tell it again
    assert len([m for m in stack.messages("l1", since_iso)
                if f"silence #{silence_id} (store) ended" in m["body"]["subject"]]) == 1
