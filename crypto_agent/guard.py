"""The backtest window's budget (runbook, 23:30-01:30 UTC) and what to do about a breach.

The runbook's budget: live trading up to 60 % CPU, the backtest up to 30 %, both together under
90 %, their memory under 1.5 GB, log errors at most 5 a minute (all settings). `decide()` says
what the guard does, one step per run:

- outside the window: resume (or start again) a backtest the guard paused (or stopped), and
  release its hold;
- live trading affected (the trader's probe is not HEALTHY): stop the backtest, page L3;
- a breach: throttle the backtest one step further: lower priority (renice), then pause
  (SIGSTOP, under a hold until the window ends); when paused and the breach is the backtest's
  own memory (a stopped process keeps it), stop it;
- no breach: nothing (a pause lasts until the window ends, so the guard does not flap).

Live trading is never throttled: the acting functions below take no service name, only the
backtest's spec, and signal only our own process (process.owned_process's ownership check).
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from crypto_agent.health import HealthStatus, ProbeReport
from crypto_agent.holds import (
    HOLD_PAUSED,
    HOLD_STOPPED,
    Hold,
    place_hold,
    read_hold,
    release_hold,
)
from crypto_agent.process import (
    NotOurProcess,
    ServiceNotRunning,
    StopResult,
    owned_process,
    service_spec,
    stop,
)
from crypto_agent.service import instance_id
from crypto_agent.settings import Settings
from crypto_agent.store import Store

GUARD_NAME = "backtest-window-guard"
BACKTEST = "backtest"


@dataclass(frozen=True)
class WindowBudget:
    """The runbook's budget for the backtest window."""

    main_cpu_pct: float = 60.0
    backtest_cpu_pct: float = 30.0
    total_cpu_pct: float = 90.0
    memory_mb: float = 1.5 * 1024
    log_errors_per_min: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> WindowBudget:
        """The budget configured in `settings`."""
        return cls(
            main_cpu_pct=settings.window_cpu_main_pct,
            backtest_cpu_pct=settings.window_cpu_backtest_pct,
            total_cpu_pct=settings.window_cpu_total_pct,
            memory_mb=settings.window_memory_max_gb * 1024,
            log_errors_per_min=float(settings.log_errors_per_min_max),
        )


class Stage(str, enum.Enum):
    """How far the backtest is throttled."""

    RUNNING = "running"
    RENICED = "reniced"
    PAUSED = "paused"
    STOPPED = "stopped"


class GuardAction(str, enum.Enum):
    """What the guard does this run."""

    NONE = "none"
    RENICE = "renice"
    PAUSE = "pause"
    STOP = "stop"
    RESUME = "resume"


@dataclass(frozen=True)
class WindowUsage:
    """What the trader and the backtest use now, from one probe of each."""

    trader: ProbeReport
    backtest: ProbeReport

    @property
    def main_cpu_pct(self) -> float:
        """The trader's CPU (0 when it does not run)."""
        return self.trader.cpu_pct or 0.0

    @property
    def backtest_cpu_pct(self) -> float:
        """The backtest daemon's CPU (0 when it does not run)."""
        return self.backtest.cpu_pct or 0.0

    @property
    def memory_mb(self) -> float:
        """Resident memory of both."""
        return (self.trader.rss_mb or 0.0) + (self.backtest.rss_mb or 0.0)

    @property
    def log_errors_per_min(self) -> float:
        """Log errors per minute of both."""
        return (self.trader.log_errors_per_min or 0.0) + (self.backtest.log_errors_per_min or 0.0)

    @property
    def live_affected(self) -> bool:
        """Whether live trading suffers: its probe is not HEALTHY (dead, stopped, stale, over a limit)."""
        return self.trader.status is not HealthStatus.HEALTHY


@dataclass(frozen=True)
class GuardDecision:
    """The guard's decision: the action, the stage it starts from, the breaches seen, whom to page."""

    action: GuardAction
    stage: Stage
    in_window: bool
    breaches: tuple[str, ...] = ()
    live_affected: bool = False
    page: str | None = None  # escalation level to tell ("l1", "l3"), None: log only
    reason: str = ""
    trader_problems: tuple[str, ...] = field(default=())


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def current_window(now: datetime, start: str, end: str) -> tuple[datetime, datetime] | None:
    """The backtest window (start, end) that holds `now` (UTC), or None; the window may cross midnight."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    s, e = _minutes(start), _minutes(end)
    length = (e - s) % (24 * 60) or 24 * 60
    for offset in (0, -1):
        begin = day + timedelta(days=offset, minutes=s)
        finish = begin + timedelta(minutes=length)
        if begin <= now < finish:
            return begin, finish
    return None


def breaches(usage: WindowUsage, budget: WindowBudget) -> list[str]:
    """The limits of the budget that the usage breaks, in words."""
    found = []
    if usage.backtest_cpu_pct > budget.backtest_cpu_pct:
        found.append(f"backtest CPU {usage.backtest_cpu_pct:.0f}% > {budget.backtest_cpu_pct:g}%")
    if usage.main_cpu_pct > budget.main_cpu_pct:
        found.append(f"live trading CPU {usage.main_cpu_pct:.0f}% > {budget.main_cpu_pct:g}%")
    total = usage.main_cpu_pct + usage.backtest_cpu_pct
    if total > budget.total_cpu_pct:
        found.append(f"total CPU {total:.0f}% > {budget.total_cpu_pct:g}%")
    if usage.memory_mb > budget.memory_mb:
        found.append(f"memory {usage.memory_mb:.0f} MB > {budget.memory_mb:.0f} MB")
    if usage.log_errors_per_min > budget.log_errors_per_min:
        found.append(f"log errors {usage.log_errors_per_min:g}/min > {budget.log_errors_per_min:g}/min")
    return found


def backtest_stage(backtest: ProbeReport, hold: Hold | None, throttle_niceness: int) -> Stage:
    """How far the backtest is throttled now, from its probe and the guard's hold on it (if any)."""
    if not backtest.alive:
        return Stage.STOPPED
    if hold is not None and hold.kind == HOLD_PAUSED:
        return Stage.PAUSED
    if backtest.niceness is not None and backtest.niceness >= throttle_niceness:
        return Stage.RENICED
    return Stage.RUNNING


def decide(
    usage: WindowUsage, budget: WindowBudget, stage: Stage, in_window: bool, *, guard_stopped: bool = False
) -> GuardDecision:
    """The guard's one step for this run (see the module docstring for the ladder).

    `guard_stopped`: the backtest is stopped under the guard's own hold (so the guard restarts it
    once the window is over; a backtest stopped by anyone else stays theirs).
    """
    if not in_window:
        if stage is Stage.PAUSED or (stage is Stage.STOPPED and guard_stopped):
            return GuardDecision(GuardAction.RESUME, stage, False, reason="the backtest window is over")
        return GuardDecision(GuardAction.NONE, stage, False, reason="outside the backtest window")
    found = tuple(breaches(usage, budget))
    trader_problems = tuple(usage.trader.reasons)
    if usage.live_affected and stage is not Stage.STOPPED:
        return GuardDecision(
            GuardAction.STOP, stage, True, found, True, page="l3", trader_problems=trader_problems,
            reason=f"live trading affected ({usage.trader.summary}): the backtest is stopped",
        )
    if not found:
        return GuardDecision(GuardAction.NONE, stage, True, reason="within budget")
    if stage is Stage.RUNNING:
        return GuardDecision(GuardAction.RENICE, stage, True, found,
                             reason="over budget: lower the backtest's priority")
    if stage is Stage.RENICED:
        return GuardDecision(GuardAction.PAUSE, stage, True, found, page="l1",
                             reason="still over budget at the lowest priority: pause the backtest")
    if stage is Stage.PAUSED and (usage.backtest.rss_mb or 0.0) > 0 and usage.memory_mb > budget.memory_mb:
        return GuardDecision(GuardAction.STOP, stage, True, found, page="l1",
                             reason="memory over budget while the backtest is paused (it keeps its memory): stop it")
    return GuardDecision(GuardAction.NONE, stage, True, found,
                         reason="over budget, and the backtest is already as throttled as the guard goes")


# --- acting on the backtest (never on the trader) ---


def renice_backtest(settings: Settings, niceness: int) -> tuple[int, int]:
    """Lower the backtest daemon's priority to `niceness` (ours only); (pid, niceness now)."""
    proc = owned_process(service_spec(BACKTEST, settings))
    if proc.nice() < niceness:
        proc.nice(niceness)
    return proc.pid, proc.nice()


def pause_backtest(settings: Settings, reason: str, until: float | None, now: float | None = None) -> Hold:
    """SIGSTOP the backtest daemon (ours only), under a paused hold placed first so monitoring never sees it unheld."""
    spec = service_spec(BACKTEST, settings)
    proc = owned_process(spec)
    hold = place_hold(BACKTEST, settings, kind=HOLD_PAUSED, by=GUARD_NAME, reason=reason, until=until,
                      instance=instance_id(proc.pid, proc.create_time()), now=now)
    proc.send_signal(signal.SIGSTOP)  # psutil re-checks the create time before sending
    return hold


def resume_backtest(settings: Settings) -> bool:
    """SIGCONT a backtest the guard paused and release the guard's hold; whether a process was resumed."""
    hold = read_hold(BACKTEST, settings, include_ended=True)  # an ended hold still names what the guard paused
    resumed = False
    if hold is not None and hold.by == GUARD_NAME and hold.kind == HOLD_PAUSED:
        try:
            proc = owned_process(service_spec(BACKTEST, settings))
        except (ServiceNotRunning, NotOurProcess):
            proc = None  # gone, or not ours any more: nothing to resume
        if proc is not None and instance_id(proc.pid, proc.create_time()) == hold.instance:
            proc.send_signal(signal.SIGCONT)
            resumed = True
    release_hold(BACKTEST, settings, by=GUARD_NAME)
    return resumed


def stop_backtest(
    settings: Settings, reason: str, until: float | None, store: Store | None = None, now: float | None = None
) -> tuple[StopResult, Hold]:
    """Stop the backtest daemon (SIGTERM, then SIGKILL; ours only) under a stopped hold until `until`."""
    hold = place_hold(BACKTEST, settings, kind=HOLD_STOPPED, by=GUARD_NAME, reason=reason, until=until, now=now)
    result = stop(service_spec(BACKTEST, settings), store=store)
    return result, hold


def hold_until(window: tuple[datetime, datetime] | None) -> float | None:
    """When a throttle placed now should end: the end of the window (None outside one)."""
    return None if window is None else window[1].timestamp()
