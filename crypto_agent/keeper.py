"""The keeper's decisions: when a dead part of the stack (Prefect server, serving process, relay, simulator,
receiver) is restarted, and when L2 is told. No Prefect here; deployments/keeper.py acts on them.

A part's first death is restarted at once; a part that keeps dying backs off (base doubling to a cap, as
systemd's RestartSec with StartLimit or Kubernetes' CrashLoopBackOff do), and the streak is forgotten
after `reset_after_s` alive. L2 hears of the first death of a streak, of the third, then at most every
`retell_s`: a crash loop is a few messages, not one per restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crypto_agent.restart_policy import backoff_s

BASE_S = 1.0
CAP_S = 60.0
RESET_AFTER_S = 600.0
RETELL_S = 3600.0
TELL_AT_STREAK = (1, 3)


@dataclass
class PartHistory:
    """What the keeper remembers of one part: its current streak of deaths and when it last told L2."""

    name: str
    streak: int = 0  # deaths since the part last stayed alive reset_after_s
    started_at: float | None = None  # when the keeper (or `up`) last started it
    dead_since: float | None = None  # when the keeper first saw it dead, None while it lives
    told_at: float | None = None
    restarts: list[float] = field(default_factory=list)
    dead_confirmed: bool = False  # seen dead at two looks in a row (a stop in progress is seen once at most)
    failed_start: bool = False  # its last restart failed (its pidfile is gone): still dead, not stopped on purpose


@dataclass(frozen=True)
class KeeperDecision:
    """What to do about a dead part now: restart it (or wait `wait_s` more), and whether to tell L2 after."""

    restart: bool
    wait_s: float
    tell: bool
    reason: str


def seen_alive(history: PartHistory, now: float, reset_after_s: float = RESET_AFTER_S) -> None:
    """The part runs: forget its streak once it has stayed up reset_after_s."""
    history.dead_since = None
    if history.started_at is not None and now - history.started_at >= reset_after_s:
        history.streak = 0


def decide(
    history: PartHistory,
    now: float,
    *,
    base_s: float = BASE_S,
    cap_s: float = CAP_S,
    retell_s: float = RETELL_S,
) -> KeeperDecision:
    """A dead part: restart at once on the first death of a streak, else after the backoff since its last start."""
    if history.dead_since is None:
        history.dead_since = now
    attempt = history.streak + 1  # this death is the attempt-th of the streak
    delay = backoff_s(attempt, base_s=base_s, cap_s=cap_s)  # 0, base, 2 x base ... cap
    since = history.started_at if history.started_at is not None else history.dead_since
    due = since + delay
    tell = attempt in TELL_AT_STREAK or history.told_at is None or now - history.told_at >= retell_s
    if now < due:
        return KeeperDecision(False, due - now, tell,
                              f"death {attempt} in a row: restarted {delay:g} s after its last start")
    reason = ("first death: restarted at once" if attempt == 1
              else f"death {attempt} in a row: restarted after a {delay:g} s backoff")
    return KeeperDecision(True, 0.0, tell, reason)


def restarted(history: PartHistory, now: float, told: bool) -> None:
    """Record a restart (and whether L2 was told of it)."""
    history.streak += 1
    history.started_at = now
    history.dead_since = None
    history.restarts.append(now)
    if told:
        history.told_at = now
