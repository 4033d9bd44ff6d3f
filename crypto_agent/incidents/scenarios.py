"""The runbook's five incident scenarios, and the words an incident is described with (status, outcome, level).

The one scenario/ETA table: the recoveries, the drills, the bench and the reports all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from crypto_agent.errors import InputError

OPEN, RESOLVED, FAILED, ESCALATED = "open", "resolved", "failed", "escalated"
STATUSES = (OPEN, RESOLVED, FAILED, ESCALATED)
# How a recovery ended: the contract's outcomes, plus "skipped" (nothing to do, e.g. a paused service).
RECOVERED, ABSORBED, SKIPPED = "recovered", "absorbed", "skipped"
OUTCOMES = (RECOVERED, ABSORBED, "escalated", "failed", SKIPPED)
LEVELS = ("l1", "l2", "l3")

# The runbook's root-cause boxes; a root cause is one of these, then ": " and the detail.
ROOT_CAUSES = ("Process hang", "DB corruption", "API throttle", "Other")


@dataclass(frozen=True)
class Scenario:
    """One incident scenario of the runbook: its number, title, recovery family and ETA."""

    name: str
    number: int
    title: str
    family: str  # recoveries of one family on one resource run one at a time
    eta_min: float  # the runbook's Quick Reference ETA

    @property
    def eta_s(self) -> float:
        """The runbook's ETA in seconds."""
        return self.eta_min * 60.0


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("daemon-crash", 1, "Daemon crashed", "service", 2),
        Scenario("stale-data", 2, "Data staleness", "data", 15),
        Scenario("db-corruption", 3, "Database corruption", "store", 30),
        Scenario("process-hang", 4, "CPU spike / process hang", "service", 5),
        Scenario("persistent-failures", 5, "Persistent failures: rollback 48 h", "rollback", 60),
    )
}


def scenario(name: str) -> Scenario:
    """The scenario called `name`; InputError naming the five otherwise."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise InputError(f"unknown incident scenario {name!r}", hint=f"use one of: {', '.join(SCENARIOS)}") from None
