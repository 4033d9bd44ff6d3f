"""A problem the recoveries cannot fix is one incident, not a storm (issue 10): recover-stale-data with the
exchange down, run again and again as the monitor would, works in the one incident that needs a person, pages
L2 once (again only after page_repeat_after_s), and the run that finds the exchange back resolves that same
incident with one "resolved" message to L1 and to L2. Messages counted at the local receiver."""

from __future__ import annotations

from typing import Any

from flow_kit import wait_for_messages
from recovery_kit import (
    all_incidents,
    filled_env,  # noqa: F401 (the `env` fixture: a store of 60 days of candles)
    settings_of,
    steps,
)

from crypto_agent.receiver import Receiver
from crypto_agent.simulator import Simulator
from flows.recovery import recover_stale_data


def subjects(inbox: Receiver, level: str) -> list[str]:
    """The subjects the receiver got for a level, oldest first."""
    return [m["body"]["subject"] for m in inbox.messages(f"/{level}")]


def test_an_unfixable_condition_is_one_incident_paged_once_until_it_clears(
    env: dict[str, Any], simulator: Simulator, inbox: Receiver
) -> None:
    cfg = settings_of(env)
    down = {**env, "request_timeout_s": 2.0}
    simulator.go_down("refuse")
    results = [recover_stale_data(settings=down, event=None) for _ in range(5)]

    assert [r["outcome"] for r in results] == ["escalated"] * 5, results
    assert len({r["incident_id"] for r in results}) == 1 and all(r["needs_person"] for r in results)
    [inc] = all_incidents(cfg)
    assert inc.status == "escalated" and inc.needs_person and inc.detections == 4
    assert steps(inc).count("check-exchange") == 5 and steps(inc).count("detected-again") == 4
    assert steps(inc).count("page-held") == 4
    assert "re-paged from" in next(a for a in inc.actions if a["step"] == "page-held")["detail"]
    [l2] = wait_for_messages(inbox, "/l2", 1)
    assert "the recovery did not succeed" in l2["body"]["body"]
    l1 = subjects(inbox, "l1")
    assert len(l1) == 2 and "opened" in l1[0] and "closed: ESCALATED" in l1[1], l1  # the first run's only
    assert len(subjects(inbox, "l2")) == 1 and subjects(inbox, "l3") == []

    # the last page is older than page_repeat_after_s: one re-page, to L2 and L1
    again = recover_stale_data(settings={**down, "page_repeat_after_s": 0}, event=None)
    assert again["incident_id"] == inc.id and again["outcome"] == "escalated"
    [_, repaged] = wait_for_messages(inbox, "/l2", 2)
    assert "still needs a person (5 detections since" in repaged["body"]["subject"]
    assert "still needs a person (5 detections since" in subjects(inbox, "l1")[-1]
    assert len(subjects(inbox, "l1")) == 3

    # the exchange is back: the next run fixes it in the same incident, one "resolved" message to L1 and L2
    simulator.come_up()
    fixed = recover_stale_data(settings=env, event=None)
    assert fixed["outcome"] == "recovered" and fixed["incident_id"] == inc.id and not fixed["needs_person"], fixed
    [inc] = all_incidents(cfg)
    assert inc.status == "resolved" and not inc.needs_person and inc.levels_told == ["l1", "l2"]
    l2_all = wait_for_messages(inbox, "/l2", 3)
    assert len(l2_all) == 3 and "resolved" in l2_all[-1]["body"]["subject"]
    assert "fixed after it needed a person (6 detections since" in l2_all[-1]["body"]["body"]
    l1 = subjects(inbox, "l1")
    assert len(l1) == 4 and "resolved" in l1[-1]
    assert subjects(inbox, "l3") == []

    # fixed, it needs nobody: the next detection opens a new incident again
    simulator.go_down("refuse")
    new = recover_stale_data(settings=down, event=None)
    assert new["incident_id"] != inc.id and new["outcome"] == "escalated"
    assert len(all_incidents(cfg)) == 2


def test_the_exchange_down_is_l2_check_the_api_then_l3_contact_binance_once_it_lasts(
    env: dict[str, Any], simulator: Simulator, inbox: Receiver
) -> None:
    down = {**env, "request_timeout_s": 2.0}
    simulator.go_down("refuse")
    first = recover_stale_data(settings=down, event=None)
    assert first["outcome"] == "escalated"
    [l2] = wait_for_messages(inbox, "/l2", 1)
    assert "Why L2: the recovery did not succeed" in l2["body"]["body"]
    assert "check the Binance API (status page, our request weight)" in l2["body"]["body"]
    assert subjects(inbox, "l3") == []

    # still down past exchange_down_l3_after_s: L3 is paged once, "contact Binance"; L2's repeat stays held
    longer = {**down, "exchange_down_l3_after_s": 0}
    again = recover_stale_data(settings=longer, event=None)
    assert again["incident_id"] == first["incident_id"]
    [l3] = wait_for_messages(inbox, "/l3", 1)
    assert "escalated to L3" in l3["body"]["subject"] and "contact Binance: the exchange has been unusable" \
        in l3["body"]["body"]
    recover_stale_data(settings=longer, event=None)  # a third detection: L3 already told, nothing new
    [inc] = all_incidents(settings_of(env))
    held = next(a for a in inc.actions if a["step"] == "page-held")
    assert inc.levels_told == ["l1", "l2", "l3"] and "newly paged: L3" in held["detail"]
    assert len(subjects(inbox, "l2")) == 1 and len(subjects(inbox, "l3")) == 1


def test_a_418_ban_pages_l3_contact_binance_at_once(
    env: dict[str, Any], simulator: Simulator, inbox: Receiver
) -> None:
    simulator.set_faults(ban_418_s=120)
    try:
        result = recover_stale_data(settings={**env, "request_timeout_s": 2.0}, event=None)
    finally:
        simulator.set_faults(ban_418_s=0)
    assert result["outcome"] == "escalated"
    [l3] = wait_for_messages(inbox, "/l3", 1)
    assert "contact Binance: the exchange banned this IP (HTTP 418)" in l3["body"]["body"]
    [l2] = wait_for_messages(inbox, "/l2", 1)
    assert "check the Binance API" in l2["body"]["body"]
