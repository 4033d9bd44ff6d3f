"""When to restart a crashed service: at once the first time, then a backoff, like CrashLoopBackOff.

The first crash of a service is restarted at once. A crash that follows a start by less than
`reset_after_s` (10 minutes: the service never ran healthily in between) continues a crash loop,
and each further crash of the loop doubles the hold: 10 s, 20 s, 40 s ... up to `cap_s` (the
runbook's 5 minutes), as systemd's StartLimit and Kubernetes' CrashLoopBackOff do. A crash whose
cause is the store (SQLite's "malformed" / "not a database") skips the backoff: the corruption
recovery runs at once. The 3-in-24 h rollback rule is not decided here (health.failures_within).

Everything here is a pure function of times (epoch seconds) and log lines, except `history()`,
which reads those times from the store's service_events.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from crypto_agent.health import FAILURE_KINDS, events
from crypto_agent.store import Store

BASE_S = 10.0
CAP_S = 300.0  # the runbook's "don't restart yet if within 5 min" (settings.crash_restart_grace_s today)
RESET_AFTER_S = 600.0
HISTORY_S = 24 * 3600.0


class RestartState(str, enum.Enum):
    """What the policy says to do with a dead service."""

    RESTART = "restart"  # restart it at once (first crash, or first after a healthy stretch)
    BACKOFF = "backoff"  # a crash loop: hold the restart delay_s seconds, then restart
    STORE_CORRUPT = "store-corrupt"  # it died of the store: run the corruption recovery at once


@dataclass(frozen=True)
class Decision:
    """The policy's answer: the state, seconds to hold (0: now), the crash's number in its loop, and why."""

    state: RestartState
    delay_s: float
    attempt: int
    reason: str
    restart_at: float  # epoch s: when the restart may happen

    @property
    def at_once(self) -> bool:
        """Whether nothing is to be waited for."""
        return self.delay_s <= 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (for an incident's actions or an event payload)."""
        return {"state": self.state.value, "delay_s": self.delay_s, "attempt": self.attempt,
                "reason": self.reason, "restart_at": self.restart_at}


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th ... 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _minutes(seconds: float) -> str:
    """600 -> '10 min', 90 -> '1.5 min'."""
    return f"{seconds / 60:g} min"


def backoff_s(attempt: int, *, base_s: float = BASE_S, cap_s: float = CAP_S) -> float:
    """The hold for the attempt-th crash of a loop: 0 for the first, then base_s doubling, at most cap_s."""
    if attempt <= 1:
        return 0.0
    return float(min(cap_s, base_s * 2 ** (attempt - 2)))


def crash_streak(starts: list[float], crashes: list[float], *, reset_after_s: float = RESET_AFTER_S) -> int:
    """How many crashes the newest belongs to in a row: a crash more than reset_after_s after the start
    before it (the service ran healthily that long) begins a new loop; 0 without crashes.

    Without a known start before a crash, the previous crash stands in for it (the service was
    restarted right after); the oldest such crash begins a loop.
    """
    ordered_starts = sorted(starts)
    streak = 0
    previous: float | None = None
    for crash in sorted(crashes):
        before = [s for s in ordered_starts if s <= crash]
        started = before[-1] if before else previous
        if started is None or crash - started >= reset_after_s:
            streak = 1
        else:
            streak += 1
        previous = crash
    return streak


def restart_delay(
    starts: list[float],
    crashes: list[float],
    now: float | None = None,
    *,
    base_s: float = BASE_S,
    cap_s: float = CAP_S,
    reset_after_s: float = RESET_AFTER_S,
) -> Decision:
    """Restart at once, or hold how long: from the service's recent starts and crashes (epoch s).

    `crashes` should include the crash at hand; when the newest start is later than every crash
    listed (the crash at hand is not recorded yet), one at `now` is assumed. The hold counts from
    the crash, so time already spent since it is deducted.
    """
    now = time.time() if now is None else now
    known = sorted(c for c in crashes if c <= now)
    if not known or (starts and max(starts) > known[-1]):
        known.append(now)  # the crash at hand, not recorded yet
    attempt = crash_streak(starts, known, reset_after_s=reset_after_s)
    crashed_at = known[-1]
    if attempt <= 1:
        why = "first crash" if len(known) == 1 else f"first crash after more than {_minutes(reset_after_s)} healthy"
        # FAILED -> RESTART
        return Decision(RestartState.RESTART, 0.0, 1, f"restart at once: {why}", now)
    hold = backoff_s(attempt, base_s=base_s, cap_s=cap_s)
    restart_at = crashed_at + hold
    delay = max(0.0, restart_at - now)
    capped = " (the cap)" if hold >= cap_s else ""
    reason = (f"backoff {hold:g} s{capped}: {_ordinal(attempt)} crash within {_minutes(reset_after_s)} of a start"
              f" (healthy for {_minutes(reset_after_s)} resets it)")
    if delay <= 0:
        reason += "; the hold is over, restart now"
    elif delay < hold:
        reason += f"; {delay:.0f} s left"
    # FAILED -> BACKOFF
    return Decision(RestartState.BACKOFF, delay, attempt, reason, max(now, restart_at))


# SQLite's SQLITE_CORRUPT and SQLITE_NOTADB messages, and "malformed" said of a database.
STORE_FAULT_RE = re.compile(
    r"database disk image is malformed"
    r"|file is not a database"
    r"|malformed database schema"
    r"|SQLITE_(?:CORRUPT|NOTADB)"
    r"|(?:sqlite|database)\w*\b.*\bmalformed"
    r"|\bmalformed\b.*\b(?:sqlite|database)",
    re.IGNORECASE,
)


def store_fault(lines: Iterable[str]) -> str | None:
    """The first log line saying the service met a corrupt store (SQLite's malformed / not a database), or None."""
    for line in lines:
        if STORE_FAULT_RE.search(line):
            return line.strip()
    return None


def decide(
    starts: list[float],
    crashes: list[float],
    now: float | None = None,
    *,
    log_lines: Iterable[str] = (),
    base_s: float = BASE_S,
    cap_s: float = CAP_S,
    reset_after_s: float = RESET_AFTER_S,
) -> Decision:
    """restart_delay(), unless the log says the store is corrupt: then the corruption recovery, at once."""
    now = time.time() if now is None else now
    decision = restart_delay(starts, crashes, now, base_s=base_s, cap_s=cap_s, reset_after_s=reset_after_s)
    line = store_fault(log_lines)
    if line is None:
        return decision
    # FAILED -> STORE_CORRUPT: no backoff, a restart would only meet the same damage
    return Decision(RestartState.STORE_CORRUPT, 0.0, decision.attempt,
                    f"corruption recovery at once, whatever the backoff: the service died of the store "
                    f"({line[:200]})", now)


def history(
    store: Store, service: str, now: float | None = None, *, since_s: float = HISTORY_S,
    crash_kinds: tuple[str, ...] = FAILURE_KINDS,
) -> tuple[list[float], list[float]]:
    """(starts, crashes) of the service in the last since_s, epoch seconds, from service_events.

    Crashes are every failure kind (crashed, killed after a hang, start-failed): each is a failed
    run the backoff counts.
    """
    starts: list[float] = []
    crashes: list[float] = []
    for e in events(store, service, since_s=since_s, now=now):
        if e["kind"] == "started":
            starts.append(e["at"] / 1000)
        elif e["kind"] in crash_kinds:
            crashes.append(e["at"] / 1000)
    return starts, crashes
