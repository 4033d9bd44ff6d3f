"""The runbook's escalation path: who beyond L1 is told when an incident closes, and why; and what to do when
the same unfixed signal comes back while its incident needs a person (join it, page or hold).

Functions of the incident and a few facts the recovery gathered; they decide, the flows tell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from crypto_agent.incidents.log import Incident, iso
from crypto_agent.incidents.scenarios import ESCALATED, FAILED, RECOVERED, RESOLVED

REPEATS_FOR_L2 = 3  # the same scenario this often within the persistent-failures window: L2 looks at it
ROLLBACK_SCENARIO = "persistent-failures"  # a rollback always goes to L3, done or failed


def levels_to_tell(
    incident: Incident,
    repeats: int,
    persistent_window_hours: float,
    *,
    live_trading_affected: bool = False,
    rollback_failed: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The levels beyond L1 to tell at the close of `incident` and why, sorted by level.

    L2 when the recovery did not succeed, or when its scenario happened `repeats` >= 3 times in the
    window; L3 for every rollback (done, or failed); L2 (the on-call lead) and L3 (the war room) whenever live
    trading was affected; `extra`
    adds the recovery's own reasons (a failed validation, a store left down), joined to any reason
    a level already has.
    """
    levels: dict[str, str] = {}
    if incident.status in (FAILED, ESCALATED):
        levels["l2"] = f"the recovery did not succeed: {incident.summary}"
    if repeats >= REPEATS_FOR_L2 and "l2" not in levels:
        levels["l2"] = (f"{incident.scenario} happened {repeats} times in {persistent_window_hours:g} h: "
                        "the same scenario keeps coming back")
    if incident.scenario == ROLLBACK_SCENARIO:
        failed = rollback_failed or incident.status != RESOLVED
        if failed and "nothing restored" in incident.summary:  # rejected at its gate, or nobody decided
            levels["l3"] = "the rollback was NOT done: " + incident.summary
        else:
            levels["l3"] = ("the rollback FAILED: " + incident.summary) if failed \
                else "a rollback to the 48 h backup was done"
    if live_trading_affected:  # the runbook's cells: L1 stops the backtest, L2 the on-call lead, L3 the war room
        for level, why in live_trading_levels().items():
            levels.setdefault(level, why)
    for level, why in (extra or {}).items():
        if level not in levels:
            levels[level] = why
        elif why not in levels[level]:
            levels[level] = f"{levels[level]}; {why}"
    return dict(sorted(levels.items()))


# What a recovery does about paging (NeedsPersonAction.page).
PAGE_AS_USUAL = "as-usual"  # no incident needs a person: open one, tell L1 and levels_to_tell's levels
PAGE_HOLD = "hold"  # it needs a person and was paged recently: tell nobody, record why in the incident
PAGE_REPEAT = "repeat"  # it still needs a person and the last page is older than the repeat interval
PAGE_RESOLVED = "resolved"  # the recovery fixed it: one "resolved" message to L1 and each level told


@dataclass(frozen=True)
class NeedsPersonAction:
    """Whether a recovery works in the incident that needs a person, and how it pages."""

    join: bool  # work in that incident (its actions appended) instead of opening a new one
    page: str  # PAGE_AS_USUAL, PAGE_HOLD, PAGE_REPEAT or PAGE_RESOLVED
    why: str


def needs_person_action(
    waiting: Incident | None,
    status: str | None = None,
    *,
    now_ms: int,
    repeat_after_s: float,
    handed_to: int | None = None,
) -> NeedsPersonAction:
    """What to do about `waiting`, the incident of this scenario and resource that needs a person (None: none).

    At the start (`status` None) a recovery joins it and holds its paging; at the close with `status`:
    resolved pages "resolved" once, failed or escalated again re-pages only when its last page is
    `repeat_after_s` old or older ("still needs a person (N detections since ...)"), else holds.
    Resolved only because another incident (`handed_to`) already works on it, it holds: that one pages.
    """
    if waiting is None or not waiting.needs_person:
        return NeedsPersonAction(False, PAGE_AS_USUAL, "no incident of it needs a person")
    since = iso(waiting.needs_person_since) or "its escalation"
    seen = f"{waiting.detections} detection{'s' if waiting.detections != 1 else ''} since {since}"
    if status is None:
        return NeedsPersonAction(True, PAGE_HOLD, f"incident #{waiting.id} needs a person ({seen}): "
                                 "the recovery runs again in it, its paging held")
    if status == RESOLVED and handed_to is not None:
        return NeedsPersonAction(True, PAGE_HOLD, f"handed over to incident #{handed_to}, which pages for it")
    if status == RESOLVED:
        return NeedsPersonAction(True, PAGE_RESOLVED, f"fixed after it needed a person ({seen})")
    last = waiting.last_paged_at
    if last is None or now_ms - last >= repeat_after_s * 1000:
        return NeedsPersonAction(True, PAGE_REPEAT, f"still needs a person ({seen})")
    return NeedsPersonAction(True, PAGE_HOLD, f"still needs a person ({seen}); last paged {iso(last)}, "
                             f"re-paged from {iso(last + int(repeat_after_s * 1000))} if it still fails")


def group_with(previous: Incident | None, now_ms: int, window_s: float) -> Incident | None:
    """The incident a new one of the same signal joins in one page (Alertmanager's group interval), or None.

    The same scenario on the same resource, recovered (resolved) less than `window_s` ago: the new
    incident's opening page is held and its close says "again" in one page, so a fault that comes back
    and is fixed again costs L1 one page, not two. An earlier incident the system did not recover itself
    (escalated, failed, skipped, resolved by a person) groups nothing: that is news, paged as usual.
    `window_s` 0 turns grouping off.
    """
    if previous is None or window_s <= 0 or previous.resolved_at is None:
        return None
    if previous.status != RESOLVED or previous.outcome != RECOVERED:
        return None
    if now_ms - previous.resolved_at > window_s * 1000:
        return None
    return previous


def budget_left_s(inc: Incident, now_ms: int) -> float:
    """Seconds until the incident's recovery runs past its scenario's ETA (the runbook's Quick Reference),
    counted from its detection, or from its rejoining for one that was waiting for a person; <= 0: over budget."""
    from crypto_agent.incidents.scenarios import scenario

    since = max(inc.detected_at, inc.rejoined_at or 0)
    return scenario(inc.scenario).eta_s - (now_ms - since) / 1000


def over_budget_note(inc: Incident, now_ms: int) -> str:
    """One sentence for the incident and for L2: how long the recovery has run against its budget."""
    from crypto_agent.incidents.scenarios import scenario

    eta = scenario(inc.scenario).eta_s
    ran = eta - budget_left_s(inc, now_ms)
    return (f"the recovery has run {ran / 60:.1f} min since the detection, past the runbook's ETA of "
            f"{eta / 60:g} min; it goes on")


# The conditions a monitor round can see gone, by scenario; a rollback always waits for a person (the backtest
# stays paused until one resumes it).
SERVICE_SCENARIOS = ("daemon-crash", "process-hang")


def condition_cleared(inc: Incident, *, healthy_resources: set[str], store_sound: bool,
                      store_fresh: bool) -> str | None:
    """Why an incident waiting for a person no longer needs one, as a monitor round sees it, or None: its service
    HEALTHY again, its store sound again (quick_check ok, no recovery lock), its data fresh again."""
    if not inc.needs_person or inc.is_open:
        return None
    if inc.scenario in SERVICE_SCENARIOS and inc.resource in healthy_resources:
        return f"{inc.resource} is HEALTHY again"
    if inc.scenario == "db-corruption" and store_sound:
        return "the store is sound again (quick_check ok, no recovery lock)"
    if inc.scenario == "stale-data" and store_fresh:
        return "the data checks pass again"
    return None


# --- the ack clock (issue 11): an unacknowledged page climbs L1 -> L2 -> L3, as PagerDuty's escalation policies ---

NEXT_LEVEL = {"l1": "l2", "l2": "l3"}


@dataclass(frozen=True)
class Climb:
    """The next level an unacknowledged incident is paged at, and the sentence that says why."""

    level: str
    why: str


def ack_climb(inc: Incident, now_ms: int, ack_timeout_s: float) -> Climb | None:
    """The level to page now because nobody acknowledged `inc`, or None: acknowledged, paged nobody yet, resolved
    (neither open nor needing a person), already at L3, or its level reached less than ack_timeout_s ago."""
    if inc.acked_at is not None or inc.paged_level is None or inc.paged_level_at is None:
        return None
    if not (inc.is_open or inc.needs_person):
        return None
    nxt = NEXT_LEVEL.get(inc.paged_level)
    if nxt is None:
        return None
    waited_s = (now_ms - inc.paged_level_at) / 1000
    if waited_s < ack_timeout_s:
        return None
    return Climb(nxt, f"nobody acknowledged incident #{inc.id} in {waited_s / 60:.0f} min at "
                 f"{inc.paged_level.upper()} (ack timeout {ack_timeout_s / 60:g} min): escalated to {nxt.upper()}; "
                 f"acknowledge with `crypto-agent ack {inc.id}` or the acknowledge deployment")


# --- the runbook's escalation cells (issue 11) ---


def exchange_levels(banned: bool, unusable_since_ms: int, now_ms: int, l3_after_s: float,
                    what: str) -> dict[str, str]:
    """Data stale because the exchange cannot be used: L2 checks the Binance API (down, throttling); L3 contacts
    Binance when it banned us (HTTP 418) or has been unusable for l3_after_s or longer."""
    levels = {"l2": f"check the Binance API (status page, our request weight): {what}"}
    down_s = (now_ms - unusable_since_ms) / 1000
    if banned:
        levels["l3"] = f"contact Binance: the exchange banned this IP (HTTP 418): {what}"
    elif down_s >= l3_after_s:
        levels["l3"] = (f"contact Binance: the exchange has been unusable for {down_s / 60:.0f} min "
                        f"(L3 after {l3_after_s / 60:g} min): {what}")
    return levels


def live_trading_levels() -> dict[str, str]:
    """Live trading affected: L1 stops the backtest (the recovery does), L2 pages the on-call lead, L3 opens the
    war room (the escalation's war-room channel when it has one)."""
    return {"l2": "live trading was affected: page the on-call lead",
            "l3": "live trading was affected: war room"}
