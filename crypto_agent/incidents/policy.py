"""The runbook's escalation path: who beyond L1 is told when an incident closes, and why.

A function of the closed incident and a few facts the recovery gathered; it decides, the flows tell.
"""

from __future__ import annotations

from collections.abc import Mapping

from crypto_agent.incidents.log import Incident
from crypto_agent.incidents.scenarios import ESCALATED, FAILED, RESOLVED

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
    window; L3 for every rollback (done, or failed) and whenever live trading was affected; `extra`
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
        levels["l3"] = ("the rollback FAILED: " + incident.summary) if failed \
            else "a rollback to the 48 h backup was done"
    if live_trading_affected and "l3" not in levels:
        levels["l3"] = "live trading was affected"
    for level, why in (extra or {}).items():
        if level not in levels:
            levels[level] = why
        elif why not in levels[level]:
            levels[level] = f"{levels[level]}; {why}"
    return dict(sorted(levels.items()))
