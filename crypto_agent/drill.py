"""The restore drill: a backup restored into a staging home of its own and the system run on it.

The first-Sunday backup test (runbook "Backup tested (dry restore on staging)"): the backup a restore would
use is put into ``drill_dir`` by the real restore (sha256 and a full integrity_check against its manifest),
the backtest daemon and the trader are started on the staging home as owned processes and must probe
HEALTHY, the data checks and one backtest run on the staging store, then both services are stopped. Nothing
of the live home (db/, run/, logs/) is read for writing or touched; the staging home is wiped at the start
of the next drill, so its logs stay for a person to read. Each drill appends one JSON line to
``drills.jsonl`` beside the staging home (``drill_record_path``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from crypto_agent import backtest, health, process, quality
from crypto_agent import backup as backups
from crypto_agent.errors import CryptoAgentError
from crypto_agent.settings import Settings
from crypto_agent.store import Store

SERVICES = ("backtest", "trader")
MARKER = ".restore-drill"  # written into every staging home; a folder without it is never wiped
RECORD_NAME = "drills.jsonl"
HEALTHY_TIMEOUT_S = 120.0
# Paths of a Settings resolved against `home`: the staging copy gets their defaults, so each lands in drill_dir.
_HOME_PATHS = ("db_path", "run_dir", "logs_dir", "backup_dir", "quarantine_dir", "incidents_db_path",
               "prefect_home", "replica_dir", "drill_dir", "receiver_log")


class DrillRefused(CryptoAgentError):
    """The drill would touch the live home (or a folder that is not a staging home); nothing was done."""


class _Failed(Exception):
    """A step of the drill failed; its text is the problem."""


@dataclass
class DrillResult:
    """One drill: passed or not, the backup drilled, its figures, and each problem in words."""

    ok: bool
    backup: str | None  # the backup's file name, db_backup_YYYYMMDD.db
    started_at: str  # ISO time (UTC) the drill started
    staging: str  # the staging home
    restore_s: float | None = None  # the restore into staging (copy, sha256, full integrity_check, counts)
    healthy_s: dict[str, float] = field(default_factory=dict)  # per service: seconds from start to HEALTHY
    tables: dict[str, int] = field(default_factory=dict)  # rows per table of the restored store
    data_checks: dict[str, Any] = field(default_factory=dict)  # staleness/coverage/continuity as of the backup
    backtest: dict[str, Any] = field(default_factory=dict)  # the one backtest unit: what ran and its metrics
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # per service: pid, stop signal, exit code
    total_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is worth knowing but did not fail the drill

    @property
    def summary(self) -> str:
        """One line: passed or failed, the backup, the first problem."""
        if self.ok:
            return f"restore drill passed: {self.backup} in {self.total_s:.1f} s"
        return f"restore drill failed ({self.backup or 'no backup'}): {self.problems[0] if self.problems else '?'}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the summary line."""
        return {**asdict(self), "summary": self.summary}


def staging_settings(settings: Settings, drill_dir: Path | None = None) -> Settings:
    """A copy of `settings` whose home is the staging home: its own db/, run/, logs/, backups/, quarantine/.

    Every field is passed explicitly, so neither the environment nor a config file can point a staging path
    back at the live home.
    """
    home = Path(drill_dir or settings.drill_dir).expanduser().resolve()
    values = {name: getattr(settings, name) for name in type(settings).model_fields}
    for name in _HOME_PATHS:
        values[name] = type(settings).model_fields[name].default
    values.update(home=home, database_url="", replica_enabled=False)
    return Settings(**values)


def drill_record_path(settings: Settings) -> Path:
    """Where drills are recorded: drills.jsonl beside the staging home (by default <home>/drills.jsonl)."""
    return Path(settings.drill_dir).expanduser().resolve().parent / RECORD_NAME


def last_drill(settings: Settings) -> dict[str, Any] | None:
    """The newest recorded drill (a DrillResult.to_dict), None when none was recorded."""
    path = drill_record_path(settings)
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return dict(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_staging(settings: Settings, drill_dir: Path | None = None, extra: tuple[Path, ...] = ()) -> Path:
    """The resolved staging home; DrillRefused when it is (or holds) a live path, or is a folder not ours."""
    staging = Path(drill_dir or settings.drill_dir).expanduser().resolve()
    live = {"home": settings.home, "db_path": settings.db_path, "run_dir": settings.run_dir,
            "logs_dir": settings.logs_dir, "backup_dir": settings.backup_dir,
            "quarantine_dir": settings.quarantine_dir, "incidents_db_path": settings.incidents_db_path,
            "replica_dir": settings.replica_dir, "prefect_home": settings.prefect_home}
    live.update({f"the backup {p.name}": p for p in extra})
    for what, path in live.items():
        resolved = Path(path).expanduser().resolve()
        if _within(resolved, staging):
            raise DrillRefused(
                f"not drilling in {staging}: the live {what} ({resolved}) is inside it, and the drill wipes it",
                hint="set drill_dir to a folder of its own (default <home>/staging), never the live home",
            )
    if len(staging.parts) < 3:
        raise DrillRefused(f"not drilling in {staging}: too close to the root of the file system",
                           hint="set drill_dir to a folder of its own, e.g. <home>/staging")
    if staging.exists() and not staging.is_dir():
        raise DrillRefused(f"not drilling in {staging}: it is a file", hint="set drill_dir to a folder")
    if staging.is_dir() and any(staging.iterdir()) and not (staging / MARKER).is_file():
        raise DrillRefused(
            f"not drilling in {staging}: it holds files and is not a staging home (no {MARKER} in it)",
            hint="point drill_dir at an empty or new folder; the drill wipes only folders it made itself",
        )
    return staging


def _stop_leftovers(staging: Settings) -> list[str]:
    """Stop services an earlier drill left running in the staging home (only our own instances)."""
    stopped = []
    for name in SERVICES:
        spec = process.service_spec(name, staging)
        if spec.pidfile.exists() and process.inspect(spec).alive:
            process.stop(spec)
            stopped.append(name)
    return stopped


def _fresh_staging(settings: Settings, staging_home: Path) -> Settings:
    """Wipe what an earlier drill left in the staging home and lay out a new one."""
    cfg = staging_settings(settings, staging_home)
    if staging_home.exists():
        _stop_leftovers(cfg)
        shutil.rmtree(staging_home)
    staging_home.mkdir(parents=True)
    (staging_home / MARKER).write_text(f"restore drill staging home, made by pid {os.getpid()}\n", encoding="utf-8")
    for folder in (cfg.db_path.parent, cfg.run_dir, cfg.logs_dir, cfg.backup_dir, cfg.quarantine_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return cfg


def pick_backup(settings: Settings, now: datetime | None = None) -> tuple[backups.BackupInfo, list[str]]:
    """The backup the restore test would test (yesterday's, unless marked bad), else the newest good one.

    NoGoodBackup when there is neither. The notes say why a fallback was drilled.
    """
    now_utc = (now or datetime.now(UTC)).astimezone(UTC)
    yesterday = backups.backup_name((now_utc - timedelta(days=1)).date())
    path = Path(settings.backup_dir) / yesterday
    if path.is_file():
        info = backups.backup_info(path)
        if info.status != backups.BAD:
            return info, []
        why = f"yesterday's backup {yesterday} is marked bad ({'; '.join(info.problems[:2])})"
    else:
        why = f"yesterday's backup {yesterday} was not found"
    chosen = backups.choose_backup(settings.backup_dir, before=now_utc)
    return chosen, [f"{why}: drilled the newest good one, {chosen.name}"]


def _as_of_ms(info: backups.BackupInfo) -> int:
    """When the backup was taken (its manifest), else the end of its day: the time its data is checked at."""
    taken = info.created_at or datetime.combine(info.day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return int(taken.timestamp() * 1000)


def _wait_healthy(spec: process.ServiceSpec, cfg: Settings, started: float, timeout_s: float) -> float:
    """Seconds from `started` until the probe says HEALTHY; _Failed with its last verdict past timeout_s."""
    deadline = started + timeout_s
    while True:
        report = health.probe(spec, cfg)
        if report.healthy:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise _Failed(f"the {spec.name} service did not probe HEALTHY within {timeout_s:g} s: {report.summary}")
        time.sleep(0.2)


def _backtest_unit(store: Store, cfg: Settings) -> dict[str, Any]:
    """The smallest real unit of backtesting (one symbol, timeframe, strategy), saved to the staging store."""
    timeframe = cfg.trader_timeframe if cfg.trader_timeframe in cfg.timeframes else cfg.timeframes[0]
    run_id = f"restore-drill-{int(time.time())}"
    lookback = cfg.daemon_lookback_days or None
    for symbol in cfg.symbols:
        started = time.monotonic()
        result = backtest.run_unit(store, symbol, timeframe, cfg.trader_strategy, run_id, lookback_days=lookback)
        if result is not None:
            return {"run_id": run_id, "symbol": symbol, "timeframe": timeframe, "strategy": cfg.trader_strategy,
                    "seconds": round(time.monotonic() - started, 3), **result.to_dict()}
    raise _Failed(f"no symbol of the universe has enough {timeframe} candles for one {cfg.trader_strategy} "
                  "backtest in the restored store")


def run_drill(
    settings: Settings,
    backup: backups.BackupInfo | None = None,
    *,
    now: datetime | None = None,
    timeout_s: float = HEALTHY_TIMEOUT_S,
    record: bool = True,
) -> DrillResult:
    """Restore a backup into the staging home, run the daemon and the trader on it, check its data, run one
    backtest, stop both; the result (recorded in drills.jsonl unless record=False).

    DrillRefused (before any work) when drill_dir is, or holds, a live path. Every other failure is a problem
    of the result, whose ok is then False.
    """
    t0 = time.monotonic()
    started_at = (now or datetime.now(UTC)).astimezone(UTC)
    staging_home = check_staging(settings, extra=(backup.path,) if backup else ())
    result = DrillResult(ok=False, backup=backup.name if backup else None,
                         started_at=started_at.isoformat(), staging=str(staging_home))
    try:
        if backup is None:
            try:
                backup, result.notes = pick_backup(settings, now)
            except backups.NoGoodBackup as exc:
                raise _Failed(f"Backup not found: {exc.message}") from None
            result.backup = backup.name
            check_staging(settings, extra=(backup.path,))
        cfg = _fresh_staging(settings, staging_home)
        _drill(cfg, backup, result, timeout_s, settings.backup_test_min_rows)
    except DrillRefused:
        raise
    except _Failed as exc:
        result.problems.append(str(exc))
    except CryptoAgentError as exc:
        result.problems.append(exc.message)
    except OSError as exc:
        result.problems.append(f"the staging home {staging_home} could not be used: {exc}")
    except Exception as exc:  # noqa: BLE001 (a drill that broke is a failed drill: recorded, and L2 is paged)
        result.problems.append(f"the drill broke: {type(exc).__name__}: {exc}")
    result.ok = not result.problems
    result.total_s = round(time.monotonic() - t0, 3)
    if record:
        _record(settings, result)
    return result


def _drill(cfg: Settings, info: backups.BackupInfo, result: DrillResult, timeout_s: float, min_rows: int) -> None:
    """Restore, start, wait for HEALTHY, check, backtest, stop (always); failures go to result.problems."""
    step = time.monotonic()
    try:
        restored = backups.restore(info.path, cfg.db_path, cfg.quarantine_dir, owner="restore drill",
                                  reason="replaced by a restore drill")
    except backups.BackupError as exc:
        raise _Failed(f"Backup corrupted or unusable: {exc.message}") from None
    result.restore_s = round(time.monotonic() - step, 3)
    result.tables = dict(restored.tables)
    h4_rows = result.tables.get("ohlcv_h4", 0)
    if h4_rows < min_rows:  # the runbook's "Test DB too small"
        result.problems.append(f"Test DB too small: {h4_rows} ohlcv_h4 rows (backup_test_min_rows {min_rows})")
    started: list[process.ServiceSpec] = []
    try:
        for name in SERVICES:
            spec = process.service_spec(name, cfg)
            step = time.monotonic()
            try:
                start = process.start(spec, cfg, timeout_s=min(timeout_s, cfg.start_timeout_s))
            except CryptoAgentError as exc:
                raise _Failed(f"the {name} service did not start on the restored store: {exc}") from None
            started.append(spec)
            result.services[name] = {"pid": start.pid, "started_s": round(start.elapsed_s, 3)}
            result.healthy_s[name] = round(_wait_healthy(spec, cfg, step, timeout_s), 3)
        with Store(cfg.database_url, create=False) as store:
            report = quality.check_data(store, cfg, now_ms=_as_of_ms(info))
            result.data_checks = {"ok": report.ok, "as_of": quality.format_utc(report.checked_at_ms),
                                  "checks": dict(report.checks), "fresh_symbols": report.fresh_symbols,
                                  "symbols": len(report.symbols), "reasons": list(report.reasons)}
            if not report.ok:
                result.problems.append("data checks of the restored store failed (as of the backup's time): "
                                       + "; ".join(report.reasons))
            result.backtest = _backtest_unit(store, cfg)
    finally:
        _stop_all(started, result)


def _stop_all(started: list[process.ServiceSpec], result: DrillResult) -> None:
    """Stop every service the drill started; one that will not stop, or stays, is a problem."""
    for spec in reversed(started):
        try:
            stop = process.stop(spec)
        except CryptoAgentError as exc:
            result.problems.append(f"the staging {spec.name} service could not be stopped: {exc}")
            continue
        result.services.setdefault(spec.name, {}).update(
            stop_signal=stop.signal, exit_code=stop.exit_code, stop_s=round(stop.elapsed_s, 3))
        if process.inspect(spec).alive:
            result.problems.append(f"the staging {spec.name} service still runs after its stop (PID {stop.pid})")
        elif stop.signal == "SIGKILL":
            result.problems.append(f"the staging {spec.name} service ignored SIGTERM and was killed")


def _record(settings: Settings, result: DrillResult) -> None:
    """Append the drill to drills.jsonl (one JSON line, fsynced)."""
    path = drill_record_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(result.to_dict(), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- telling people ---

ALERT_KEY = "backup:restore-drill-failed"  # the alert episode of a failing drill (L2 hears once per episode)


def page_message(result: DrillResult) -> tuple[str, str]:
    """Subject and body telling L2 the drill failed: what, which backup, the problems, what to do next."""
    subject = f"[crypto-agent] restore drill failed: {result.backup or 'no backup to drill'}"
    lines = [
        (f"what happened: the monthly restore drill of {result.backup or 'the newest good backup'} into the "
         f"staging home {result.staging} failed; the live store, services and logs were not touched"),
        "problems:",
        *(f"- {p}" for p in result.problems[:10]),
    ]
    if len(result.problems) > 10:
        lines.append(f"- and {len(result.problems) - 10} more")
    lines.extend(f"note: {n}" for n in result.notes)
    lines.append(
        "to do: a restore from this backup may not work. Take a fresh backup (deployment backup/daily), rerun the "
        f"drill (backup-restore-test), read the staging logs in {result.staging}/logs; `crypto-agent backups` "
        "lists the backups and their status"
    )
    return subject, "\n".join(lines)


def report_markdown(result: DrillResult) -> str:
    """The drill as a markdown report: verdict, figures, problems."""
    verdict = "passed" if result.ok else "FAILED"
    rows = [
        ("backup", result.backup or "none"),
        ("staging home", result.staging),
        ("restore (copy, sha256, integrity_check)", "-" if result.restore_s is None else f"{result.restore_s:.2f} s"),
        *((f"{name}: seconds to HEALTHY", f"{s:.2f} s") for name, s in result.healthy_s.items()),
        ("rows per table", ", ".join(f"{t} {n}" for t, n in result.tables.items()) or "-"),
        ("data checks (as of the backup)", _checks_line(result.data_checks)),
        ("backtest", _backtest_line(result.backtest)),
        ("total", f"{result.total_s:.2f} s"),
    ]
    out = [f"## Restore drill {verdict}", "", "| figure | value |", "| --- | --- |"]
    out.extend(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    if result.problems:
        out += ["", "### Problems", "", *(f"- {p}" for p in result.problems)]
    if result.notes:
        out += ["", "### Notes", "", *(f"- {n}" for n in result.notes)]
    return "\n".join(out) + "\n"


def _checks_line(checks: dict[str, Any]) -> str:
    if not checks:
        return "-"
    named = ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.get("checks", {}).items())
    return f"{named}; {checks.get('fresh_symbols')} of {checks.get('symbols')} symbols fresh at {checks.get('as_of')}"


def _backtest_line(bt: dict[str, Any]) -> str:
    if not bt:
        return "-"
    ret = bt.get("total_return")
    shown = "n/a" if ret is None else f"{ret:+.2%}"
    return (f"{bt.get('strategy')} {bt.get('symbol')} {bt.get('timeframe')}: {bt.get('candles')} candles, "
            f"{bt.get('trades')} trades, return {shown} ({bt.get('seconds')} s)")
