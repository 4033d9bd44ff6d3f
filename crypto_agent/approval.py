"""The human gate on the last resort (issue 11): what the rollback would restore and lose, told before anything is
stopped, and what to do with a person's answer, or with none by the timeout.

No Prefect here: the flow pauses for the answer in the Prefect UI, and acts on what these return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from crypto_agent import backup
from crypto_agent.incidents import iso

# What the rollback does next (GateDecision.action).
PROCEED = "proceed"  # approved, or no decision and rollback_on_timeout=proceed: restore the backup
REJECT = "reject"  # a person said no: nothing restored, the incident needs a person
ASK_AGAIN = "ask-again"  # no decision and rollback_on_timeout=wait: page L3 once more and wait again
GIVE_UP = "give-up"  # no decision after the last ask allowed: nothing restored, the incident needs a person

ON_TIMEOUT = ("proceed", "wait")
MAX_ASKS = 4  # with rollback_on_timeout=wait: L3 is asked at most this often (30 min each by default: 2 h)
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class RollbackPlan:
    """The backup a rollback would restore (chosen, not restored), when it was taken, and what newer data it
    replaces."""

    backup: backup.BackupInfo
    taken_at_ms: int
    newer_hours: float  # hours of data newer than the backup that the restore replaces
    quarantine_dir: Path  # where the replaced database is kept

    @property
    def name(self) -> str:
        """The backup's file name."""
        return self.backup.name

    def describe(self) -> str:
        """One sentence: which backup, its time, what would be replaced and where it is kept."""
        return (f"would restore {self.name} (taken {iso(self.taken_at_ms)}, {self.newer_hours:.1f} h ago): the "
                f"{self.newer_hours:.1f} h of data newer than it are replaced, the current database kept in "
                f"quarantine in {self.quarantine_dir} (candles are re-fetched from the exchange afterwards)")


def plan_rollback(backup_dir: Path | str, hours: float, quarantine_dir: Path | str,
                  now_ms: int) -> RollbackPlan | None:
    """The rollback's backup, as the restore chooses it (the newest good one `hours` old or older:
    backup.backup_for_hours_ago), described without restoring anything; None when none qualifies."""
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    try:
        info = backup.backup_for_hours_ago(backup_dir, hours, now)
    except backup.NoGoodBackup:
        return None
    taken = info.created_at or datetime(info.day.year, info.day.month, info.day.day, tzinfo=UTC)
    taken_ms = int(taken.timestamp() * 1000)
    newer = max(0.0, (now_ms - taken_ms) / HOUR_MS)
    return RollbackPlan(info, taken_ms, round(newer, 2), Path(quarantine_dir))


@dataclass(frozen=True)
class PausePlan:
    """How the flow waits for the decision: each pause's timeout and poll (whole seconds, as Prefect takes them),
    and how many times a person is asked before the gate stops waiting."""

    timeout_s: int
    poll_s: int
    asks: int
    on_timeout: str


def pause_plan(timeout_s: float, on_timeout: str, budget_s: float) -> PausePlan:
    """The pauses for rollback_approval_timeout_s and rollback_on_timeout, all of them within `budget_s` (what the
    flow's own timeout leaves for waiting): "proceed" asks once; "wait" asks again after each timeout, up to
    MAX_ASKS times."""
    if on_timeout not in ON_TIMEOUT:
        raise ValueError(f"rollback_on_timeout must be one of {', '.join(ON_TIMEOUT)}, got {on_timeout!r}")
    pause = max(0, math.ceil(min(timeout_s, budget_s)))
    asks = 1 if on_timeout == "proceed" else max(1, min(MAX_ASKS, int(budget_s // max(pause, 1))))
    return PausePlan(pause, max(1, min(5, pause // 4)), asks, on_timeout)


@dataclass(frozen=True)
class Answer:
    """A person's answer in the Prefect UI."""

    approve: bool
    by: str
    note: str = ""

    @property
    def who(self) -> str:
        """Who answered, as recorded."""
        return self.by.strip() or "someone who gave no name"


@dataclass(frozen=True)
class GateDecision:
    """What the rollback does with an answer (or with none), and the action it records in the incident."""

    action: str  # PROCEED, REJECT, ASK_AGAIN or GIVE_UP
    step: str  # the incident action's step
    detail: str  # the incident action's detail; for REJECT and GIVE_UP the start of the incident's summary
    ok: bool = True


def decide(answer: Answer | None, plan: PausePlan, asked: int) -> GateDecision:
    """The decision after the `asked`-th pause: an answer is followed; no answer (the pause timed out) proceeds
    with on_timeout "proceed", and with "wait" asks again until plan.asks asks went unanswered, then gives up."""
    if answer is not None:
        note = f": {answer.note.strip()}" if answer.note.strip() else ""
        if answer.approve:
            return GateDecision(PROCEED, "approval", f"rollback approved by {answer.who}{note}")
        return GateDecision(REJECT, "approval", f"rollback rejected by {answer.who}{note}")
    waited = f"no decision within {plan.timeout_s} s"
    if plan.on_timeout == "proceed":
        return GateDecision(PROCEED, "approval-timeout",
                            f"{waited}: proceeding as the runbook's automatic last resort")
    if asked < plan.asks:
        return GateDecision(ASK_AGAIN, "approval-timeout",
                            f"{waited} (ask {asked} of {plan.asks}): L3 paged again, still waiting "
                            "(rollback_on_timeout=wait)", ok=False)
    return GateDecision(GIVE_UP, "approval-timeout",
                        f"rollback not approved: no decision after {asked} ask(s) of {plan.timeout_s} s "
                        "(rollback_on_timeout=wait never rolls back alone)", ok=False)


def request_text(plan: RollbackPlan, pauses: PausePlan, asked: int, link: str) -> str:
    """What L3 is told (and the Prefect UI shows above the form) when the rollback asks for approval."""
    if pauses.on_timeout == "proceed":
        otherwise = f"Without a decision within {pauses.timeout_s} s the rollback proceeds on its own"
    elif asked < pauses.asks:
        otherwise = (f"Without a decision within {pauses.timeout_s} s L3 is asked again "
                     f"(ask {asked} of {pauses.asks}); nothing is restored without a decision")
    else:
        otherwise = (f"This is the last ask ({asked} of {pauses.asks}): without a decision within "
                     f"{pauses.timeout_s} s nothing is restored and the incident waits for a person")
    return "\n".join([
        f"The rollback (the runbook's last resort) waits for approval: it {plan.describe()}.",
        "Nothing was stopped yet; the backtest is paused, live trading runs as it was.",
        (f"Approve or reject it in the Prefect UI: {link} (Resume: approve true or false, by: your name, "
         "note: why)."),
        f"{otherwise} (rollback_approval_timeout_s, rollback_on_timeout={pauses.on_timeout}).",
    ])
