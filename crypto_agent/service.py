"""The in-process runtime every long-running service uses.

A service (the backtest daemon, the paper trader) wraps its main loop in a `ServiceRuntime`, which:

- claims the pidfile: an exclusive `flock` on `run/<name>.lock` for the whole life of the process
  decides who owns the service (the kernel drops it when the process dies, so a crash never leaves
  a lock behind); a pidfile left by a dead instance is taken over, and reported as that instance's
  crash. Next to the pidfile, `run/<name>.pid.json` records the PID, its create time and command
  line, which process control checks before it ever sends a signal.
- writes the heartbeat from the main loop only (never a side thread, so a hung loop shows as a stale
  heartbeat): first line the UTC epoch in seconds, second line the state ("running: ...",
  "paused: db/LOCKED"), third line the PID; temp file + os.replace, so a reader never sees half.
- logs to a rotating file with the UTC time and the level on every line, continuation lines of a
  traceback included, so errors per minute can be counted (`health.log_errors_per_minute`).
- handles SIGTERM/SIGINT (stop after the current unit), SIGUSR1 (every thread's stack to
  `logs/<name>_stacks_<epoch>.txt`), and pauses writes while `db/LOCKED` exists (and, for the backtest,
  while live trading comes first: `hold_while_yielding`, crypto_agent.priority).
"""

from __future__ import annotations

import faulthandler
import fcntl
import json
import logging
import logging.handlers
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn, Self

import psutil
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.schema import service_events
from crypto_agent.settings import Settings, get_settings
from crypto_agent.store import Store, open_store, store_locked
from crypto_agent.storelock import lock_name

# name -> (file stem in run/, log file name in logs/); the runbook's names, relied on by others
SERVICE_FILES: dict[str, tuple[str, str]] = {
    "backtest": ("backtest", "backtest_24h7.log"),
    "trader": ("trader", "trader.log"),
}
SERVICE_NAMES: tuple[str, ...] = tuple(SERVICE_FILES)
# The module each service runs as: `python -m <module>`, with the same interpreter as ours.
SERVICE_MODULES: dict[str, str] = {"backtest": "crypto_agent.daemon", "trader": "crypto_agent.trader"}

STATE_STARTING = "starting"
STATE_RUNNING = "running"
STATE_PAUSED_LOCKED = "paused: db/LOCKED"
STATE_PAUSED_LIVE_TRADING = "paused: live trading first"  # the backtest yields to the trader (crypto_agent.priority)
STATE_STOPPED = "stopped"
# A service that met SQLite's "malformed" / "not a database" says so in its heartbeat, "store corrupt: <error>",
# and keeps beating without touching the store; the heartbeat relay turns it into crypto-agent.store.corrupt.
STATE_STORE_CORRUPT = "store corrupt"
STORE_CORRUPT_ERROR_CHARS = 300  # the heartbeat is three lines: the error is kept on one, this long at most

# Exit code of a service whose main loop died of an unexpected exception (BSD's EX_SOFTWARE).
EXIT_CRASHED = 70

LOG_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
# A log line: "<UTC time>Z <LEVEL> <logger>[<pid>]: <message>"; continuation lines use "|" for ":".
LOG_LINE_RE = re.compile(
    rb"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?Z (?P<level>[A-Z]+) \S+?\[\d+\](?P<kind>[:|]) "
)


class ServiceAlreadyRunning(CryptoAgentError):
    """Another live instance of the service owns its pidfile; nothing was started."""


class ServiceStateError(CryptoAgentError):
    """The service's state files (run/, logs/) cannot be written; nothing was started."""


def ensure_state_dirs(paths: ServicePaths) -> None:
    """Create run/ and logs/; ServiceStateError, naming the folder and the setting, when impossible."""
    for folder, setting in ((paths.pidfile.parent, "RUN_DIR"), (paths.logs_dir, "LOGS_DIR")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=f".{paths.name}-write-test-"):
                pass
        except OSError as exc:
            raise ServiceStateError(
                f"cannot write the {paths.name} service's files in {folder}: {exc.strerror or exc}",
                hint=f"set CRYPTO_AGENT_{setting} (or CRYPTO_AGENT_HOME) to a writable folder",
            ) from None


# --- where a service keeps its state ---


@dataclass(frozen=True)
class ServicePaths:
    """One service's files and how it runs: command, pidfile and its ownership record, heartbeat, lock,
    log, stack dumps, hold marker, priority and timeouts. Process control calls it a ServiceSpec."""

    name: str
    command: tuple[str, ...]
    pidfile: Path
    pid_record: Path
    heartbeat: Path
    lock: Path
    log: Path
    logs_dir: Path
    niceness: int
    stop_grace_s: float
    start_timeout_s: float

    @property
    def stacks_glob(self) -> str:
        """Glob (in logs_dir) of this service's stack dumps."""
        return f"{self.name}_stacks_*.txt"

    @property
    def hold_marker(self) -> Path:
        """The file that holds the service stopped or paused on purpose: run/<name>.paused (crypto_agent.holds)."""
        return self.pidfile.with_name(f"{self.name}.paused")


def service_paths(name: str, settings: Settings | None = None) -> ServicePaths:
    """The files and command of service `name` ("backtest" or "trader"); InputError for another name."""
    if name not in SERVICE_FILES:
        raise InputError(
            f"unknown service {name!r}",
            hint=f"use one of: {', '.join(SERVICE_NAMES)}",
        )
    settings = settings or get_settings()
    stem, log_name = SERVICE_FILES[name]
    run_dir = Path(settings.run_dir)
    logs_dir = Path(settings.logs_dir)
    return ServicePaths(
        name=name,
        command=(sys.executable, "-m", SERVICE_MODULES[name]),
        pidfile=run_dir / f"{stem}.pid",
        pid_record=run_dir / f"{stem}.pid.json",
        heartbeat=run_dir / f"{stem}.heartbeat",
        lock=run_dir / f"{stem}.lock",
        log=logs_dir / log_name,
        logs_dir=logs_dir,
        niceness=settings.daemon_niceness if name == "backtest" else 0,
        stop_grace_s=settings.stop_grace_s,
        start_timeout_s=settings.start_timeout_s,
    )


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` through a temp file in the same folder, so readers never see half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# --- heartbeat ---


@dataclass(frozen=True)
class Heartbeat:
    """A heartbeat file read back: when it was written, the state it gave, the PID that wrote it."""

    epoch: int
    state: str
    pid: int | None

    def age_s(self, now: float | None = None) -> float:
        """Seconds since it was written."""
        return (time.time() if now is None else now) - self.epoch


def write_heartbeat(path: Path, state: str, pid: int | None = None, now: float | None = None) -> int:
    """Write a heartbeat atomically: epoch seconds, state, PID on three lines; the epoch written."""
    epoch = int(time.time() if now is None else now)
    write_atomic(path, f"{epoch}\n{state}\n{os.getpid() if pid is None else pid}\n")
    return epoch


def read_heartbeat(path: Path) -> Heartbeat | None:
    """The heartbeat in `path`, None when there is none; ValueError when its first line is no epoch."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    lines = text.splitlines()
    if not lines or not lines[0].strip().isdigit():
        raise ValueError(f"heartbeat {path} does not start with an epoch: {text[:40]!r}")
    state = lines[1].strip() if len(lines) > 1 else ""
    pid = int(lines[2]) if len(lines) > 2 and lines[2].strip().isdigit() else None
    return Heartbeat(int(lines[0]), state, pid)


def store_corrupt_state(error: str) -> str:
    """The heartbeat state of a service that met a corrupt store: 'store corrupt: <error on one line>'."""
    line = " ".join(str(error).split())[:STORE_CORRUPT_ERROR_CHARS]
    return f"{STATE_STORE_CORRUPT}: {line or 'unknown error'}"


def store_corrupt_error(state: str) -> str | None:
    """The error a 'store corrupt: <error>' heartbeat state reports, None for any other state."""
    prefix = STATE_STORE_CORRUPT + ":"
    return state[len(prefix):].strip() if state.startswith(prefix) else None


def store_fault_of(exc: BaseException) -> str | None:
    """The error text when `exc` is SQLite saying the store is corrupt ("malformed", "not a database"), else None."""
    # restart_policy's pattern is the one definition of a store fault; imported here, as it imports this module
    from crypto_agent.restart_policy import store_fault

    for text in (str(getattr(exc, "orig", "") or ""), str(exc)):  # SQLite's own words first
        if text and store_fault([text]) is not None:
            return text
    return None


# --- pidfile and its ownership record ---


@dataclass(frozen=True)
class PidRecord:
    """What proves that a PID is still the service instance that wrote it."""

    service: str
    pid: int
    create_time: float
    cmdline: list[str]
    started_at: float

    @property
    def instance(self) -> str:
        """The process instance as "<pid>@<create time>", unique even when PIDs are reused."""
        return instance_id(self.pid, self.create_time)


def instance_id(pid: int, create_time: float | None) -> str:
    """A process instance key: PID and create time, so a reused PID is another instance."""
    return f"{pid}@{create_time:.2f}" if create_time is not None else f"{pid}@?"


def read_pid(path: Path) -> int | None:
    """The PID in a pidfile, None when the file is missing; ValueError when it holds no positive integer."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"pidfile {path} holds {text[:20]!r}, not a PID")
    return int(text)


def read_pid_record(path: Path) -> PidRecord | None:
    """The ownership record next to a pidfile, None when missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PidRecord(
            service=str(data["service"]),
            pid=int(data["pid"]),
            create_time=float(data["create_time"]),
            cmdline=[str(a) for a in data["cmdline"]],
            started_at=float(data.get("started_at", 0.0)),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_mismatch(record: PidRecord, proc: psutil.Process) -> str | None:
    """Why `proc` is not the instance `record` describes, or None when it is (create time and command line)."""
    try:
        create_time = proc.create_time()
        cmdline = proc.cmdline()
    except psutil.AccessDenied:
        return f"PID {proc.pid} belongs to another user"
    except psutil.NoSuchProcess:
        return f"process {proc.pid} is gone"
    if record.pid != proc.pid:
        return f"the ownership record names PID {record.pid}, not {proc.pid}"
    if abs(create_time - record.create_time) > 0.05:
        return (
            f"PID {proc.pid} was started at {create_time:.2f}, the {record.service} service at "
            f"{record.create_time:.2f}: the PID was reused"
        )
    if cmdline != record.cmdline:
        return f"PID {proc.pid} runs {' '.join(cmdline)[:120]!r}, not {' '.join(record.cmdline)[:120]!r}"
    return None


# --- service events (started, stopped, crashed, killed, start-failed) ---


def record_event(
    store: Store,
    service: str,
    kind: str,
    *,
    pid: int | None,
    instance: str,
    source: str,
    detail: str = "",
    at: float | None = None,
) -> bool:
    """Record a service event once per (service, kind, instance); False when the store is locked or it was known."""
    if store_locked(store):
        return False
    stmt = event_insert(service, kind, pid=pid, instance=instance, source=source, detail=detail, at=at)
    with store.engine.begin() as conn:
        return conn.execute(stmt).rowcount > 0


def event_insert(
    service: str, kind: str, *, pid: int | None, instance: str, source: str, detail: str = "", at: float | None = None
) -> Any:
    """The INSERT of one service event that does nothing when (service, kind, instance) is already known."""
    return sqlite_insert(service_events).values(
        service=service,
        kind=kind,
        at=int((time.time() if at is None else at) * 1000),
        pid=pid,
        instance=instance,
        source=source,
        detail=detail[:2000],
    ).on_conflict_do_nothing()


# --- logging ---


class ServiceLogFormatter(logging.Formatter):
    """UTC time, level and logger on every line, continuation lines of a message or traceback included."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime(LOG_TIME_FORMAT, time.gmtime(record.created))
        prefix = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name}[{record.process}]"
        text = super().format(record)
        lines = text.splitlines() or [""]
        return "\n".join(
            [f"{prefix}: {lines[0]}"] + [f"{prefix}| {line}" for line in lines[1:]]
        )


class _StdioFollowingHandler(logging.handlers.RotatingFileHandler):
    """A rotating file handler that, when asked, keeps fds 1 and 2 on the current log file.

    So stray output (a C library's message, a fatal-error dump of faulthandler) lands in the log
    the operator reads, also after a rotation.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int, capture_stdio: bool) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.capture_stdio = capture_stdio
        self._point_stdio()

    def _point_stdio(self) -> None:
        if self.capture_stdio and self.stream is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self.stream.fileno(), 1)
            os.dup2(self.stream.fileno(), 2)

    def doRollover(self) -> None:
        """Rotate, then move stdout and stderr to the new file."""
        super().doRollover()
        self._point_stdio()


# --- the runtime ---


@dataclass
class ServiceRuntime:
    """Pidfile, heartbeat, log, signals and the LOCKED pause of one service process; use it as `with`.

    On leaving the block normally (a stop was requested, or the loop returned) it removes its pidfile
    and writes a last "stopped" heartbeat; exit_code stays 0. An exception escaping the block is a
    crash: it is logged (CRITICAL, with its traceback), recorded as a crashed event, the pidfile is
    kept as evidence, the exception is swallowed and exit_code becomes EXIT_CRASHED.
    """

    name: str
    settings: Settings
    niceness: int = 0
    capture_stdio: bool | None = None  # None: capture unless stderr is a terminal
    paths: ServicePaths = field(init=False)
    log: logging.Logger = field(init=False)
    state: str = field(init=False, default=STATE_STARTING)
    exit_code: int = field(init=False, default=0)
    record: PidRecord | None = field(init=False, default=None)
    predecessor: PidRecord | None = field(init=False, default=None)
    stale_pid: int | None = field(init=False, default=None)
    store: Store | None = field(init=False, default=None)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _stop_signal: str | None = field(init=False, default=None)
    _lock_fd: int | None = field(init=False, default=None)
    _handler: logging.Handler | None = field(init=False, default=None)
    _console: logging.Handler | None = field(init=False, default=None)
    _previous_signals: dict[int, Any] = field(init=False, default_factory=dict)
    _paused: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.paths = service_paths(self.name, self.settings)
        self.log = logging.getLogger(f"crypto_agent.{self.name}")

    # --- life cycle ---

    def __enter__(self) -> Self:
        ensure_state_dirs(self.paths)
        self._claim()
        try:
            self._setup_logging()
            self._set_niceness()
            self._install_signals()
            self.beat(STATE_STARTING)
        except BaseException:
            self._release(remove_pidfile=True)
            raise
        took_over = ""
        if self.stale_pid is not None:
            took_over = f"; took over the stale pidfile of PID {self.stale_pid} (no live instance owned it)"
        self.log.info(
            "%s service started: PID %d, niceness %d%s", self.name, os.getpid(), os.nice(0), took_over
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        crashed = exc is not None and isinstance(exc, Exception)
        if crashed:
            self.exit_code = EXIT_CRASHED
            self.log.critical("%s service crashed: %s", self.name, exc, exc_info=exc)
            self._record("crashed", f"{type(exc).__name__}: {exc}")
        else:
            why = f" on {self._stop_signal}" if self._stop_signal else ""
            self.log.info("%s service stopped%s", self.name, why)
            self._record("stopped", f"clean stop{why}")
        self.beat("crashed" if crashed else STATE_STOPPED)
        if self.store is not None:
            self.store.close()
        self._release(remove_pidfile=not crashed)
        self._restore_signals()
        self._teardown_logging()
        return crashed

    def open_store(self) -> Store:
        """Open the store the settings point at and attach it (see attach_store)."""
        store = open_store(self.settings)
        self.attach_store(store)
        return store

    def attach_store(self, store: Store) -> None:
        """Use `store` for service events: record this start (and the crash of a stale predecessor)."""
        self.store = store
        if self.predecessor is not None:
            self._record_for(
                self.predecessor.pid, self.predecessor.instance, "crashed",
                f"found dead by its successor PID {os.getpid()} (stale pidfile)",
            )
        self._record("started", f"niceness {os.nice(0)}")

    # --- the main loop's tools ---

    @property
    def stopping(self) -> bool:
        """Whether a stop (SIGTERM, SIGINT) was requested."""
        return self._stop.is_set()

    def request_stop(self, reason: str = "request") -> None:
        """Ask the main loop to stop after the current unit of work."""
        self._stop_signal = self._stop_signal or reason
        self._stop.set()

    def beat(self, state: str | None = None) -> None:
        """Write the heartbeat now (from the main loop only), with a new state if given."""
        if state is not None:
            self.state = state
        try:
            write_heartbeat(self.paths.heartbeat, self.state)
        except OSError as exc:
            self.log.error("cannot write the heartbeat %s: %s", self.paths.heartbeat, exc)

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, heart-beating every heartbeat_interval_s; False if a stop was requested."""
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            self.beat()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return not self.stopping
            if self._stop.wait(min(remaining, self.settings.heartbeat_interval_s)):
                return False

    def hold_while_locked(self, store: Store) -> bool:
        """Return at once when the store is not locked; else pause, heart-beating, until it is; False on stop."""
        if not store_locked(store):
            if self._paused:
                self._paused = False
                self.log.info("%s removed: writes resumed", self._lock_path(store))
            return not self.stopping
        if not self._paused:
            self._paused = True
            self.log.warning("%s exists (a recovery holds the store): writes paused", self._lock_path(store))
        resume_state = self.state if self.state != STATE_PAUSED_LOCKED else STATE_RUNNING
        self.beat(STATE_PAUSED_LOCKED)
        while store_locked(store):
            if not self.wait(min(1.0, self.settings.heartbeat_interval_s)):
                return False
        self._paused = False
        self.log.info("%s removed: writes resumed", self._lock_path(store))
        self.beat(resume_state)
        return not self.stopping

    def hold_while_yielding(self, requested: Callable[[], str | None]) -> bool:
        """Return at once when `requested()` is None; else pause, heart-beating, until it is; False on stop.

        `requested()` says why to yield (one line for the log), None when there is no reason; it is asked
        about every min(1 s, heartbeat interval), so the service resumes within a heartbeat of it ending.
        """
        why = requested()
        if why is None:
            return not self.stopping
        self.log.warning("%s: new work paused until the request is withdrawn", why)
        resume_state = self.state if self.state != STATE_PAUSED_LIVE_TRADING else STATE_RUNNING
        self.beat(STATE_PAUSED_LIVE_TRADING)
        while requested() is not None:
            if not self.wait(min(1.0, self.settings.heartbeat_interval_s)):
                return False
        self.log.info("the yield request was withdrawn: work resumed")
        self.beat(resume_state)
        return not self.stopping

    def pause_on_store_corrupt(self, error: str) -> bool:
        """Say 'store corrupt: <error>' in the heartbeat and keep off the store for store_corrupt_retry_s,
        heart-beating; then the caller tries the store again. False when a stop was requested meanwhile.

        The state is what reports the fault (the heartbeat relay emits crypto-agent.store.corrupt once per
        instance); the service neither crashes nor hammers the damaged file while the recovery repairs it.
        """
        state = store_corrupt_state(error)
        if self.state != state:
            self.log.error("the store is corrupt (%s): store work paused, retried every %g s until a recovery "
                           "repairs it", error, self.settings.store_corrupt_retry_s)
        self.beat(state)
        return self.wait(self.settings.store_corrupt_retry_s)

    @staticmethod
    def _lock_path(store: Store) -> str:
        return lock_name(store.path)

    # --- internals ---

    def _claim(self) -> None:
        p = self.paths
        fd = os.open(p.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._already_running(_safe_read_pid(p.pidfile)) from None
        self._lock_fd = fd
        me = psutil.Process()
        existing = read_pid_record(p.pid_record)
        existing_pid = _safe_read_pid(p.pidfile)
        if existing is not None and existing.pid == existing_pid and existing.pid != me.pid:
            try:
                alive_and_ours = record_mismatch(existing, psutil.Process(existing.pid)) is None
            except psutil.NoSuchProcess:
                alive_and_ours = False
            if alive_and_ours:
                # the lock file was deleted under a live instance: still refuse a second one
                self._release(remove_pidfile=False)
                raise self._already_running(existing.pid)
            self.predecessor = existing
        if existing_pid is not None and existing_pid != me.pid:
            self.stale_pid = existing_pid
        self.record = PidRecord(self.name, me.pid, me.create_time(), me.cmdline(), time.time())
        # the record first: whoever reads the new pidfile finds its proof already in place
        write_atomic(p.pid_record, json.dumps({
            "service": self.record.service,
            "pid": self.record.pid,
            "create_time": self.record.create_time,
            "cmdline": self.record.cmdline,
            "started_at": self.record.started_at,
        }))
        write_atomic(p.pidfile, f"{me.pid}\n")

    def _already_running(self, pid: int | None) -> ServiceAlreadyRunning:
        who = f"PID {pid}" if pid else "another process"
        return ServiceAlreadyRunning(
            f"the {self.name} service is already running ({who}, pidfile {self.paths.pidfile})",
            hint=f"stop it first (`crypto-agent service stop {self.name}`), "
            f"or check it with `crypto-agent status --service {self.name}`",
        )

    def _release(self, remove_pidfile: bool) -> None:
        if remove_pidfile and _safe_read_pid(self.paths.pidfile) == os.getpid():
            for path in (self.paths.pidfile, self.paths.pid_record):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _setup_logging(self) -> None:
        capture = self.capture_stdio
        if capture is None:
            capture = not sys.stderr.isatty()
        handler = _StdioFollowingHandler(
            self.paths.log, self.settings.log_max_bytes, self.settings.log_backups, capture
        )
        handler.setFormatter(ServiceLogFormatter())
        root = logging.getLogger()
        root.addHandler(handler)
        if not capture:
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(ServiceLogFormatter())
            root.addHandler(console)
            self._console = console
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        self._handler = handler
        # fatal errors (a segfault in a C extension) go to fd 2, which follows the log when captured
        faulthandler.enable(file=sys.stderr, all_threads=True)

    def _teardown_logging(self) -> None:
        root = logging.getLogger()
        for h in (self._handler, self._console):
            if h is not None:
                root.removeHandler(h)
                h.close()
        self._handler = self._console = None

    def _set_niceness(self) -> None:
        current = os.nice(0)
        if self.niceness > current:
            os.nice(self.niceness - current)
        elif self.niceness < current:
            self.log.warning(
                "niceness stays %d: lowering it to %d needs privileges", current, self.niceness
            )

    def _install_signals(self) -> None:
        for sig, handler in (
            (signal.SIGTERM, self._on_stop_signal),
            (signal.SIGINT, self._on_stop_signal),
            (signal.SIGUSR1, self._on_dump_signal),
        ):
            self._previous_signals[sig] = signal.signal(sig, handler)

    def _restore_signals(self) -> None:
        for sig, previous in self._previous_signals.items():
            signal.signal(sig, previous)
        self._previous_signals.clear()

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.request_stop(signal.Signals(signum).name)

    def _on_dump_signal(self, _signum: int, _frame: FrameType | None) -> None:
        path = dump_stacks_to_file(self.paths)
        self.log.info("stacks of all threads written to %s (SIGUSR1)", path)

    def _record(self, kind: str, detail: str) -> None:
        if self.record is not None:
            self._record_for(self.record.pid, self.record.instance, kind, detail)

    def _record_for(self, pid: int, instance: str, kind: str, detail: str) -> None:
        if self.store is None:
            return
        try:
            if not record_event(
                self.store, self.name, kind, pid=pid, instance=instance, source="service", detail=detail
            ) and store_locked(self.store):
                self.log.warning("store locked: %s event of PID %d not recorded", kind, pid)
        except SQLAlchemyError as exc:
            self.log.error("cannot record the %s event of PID %d: %s", kind, pid, exc)


def dump_stacks_to_file(paths: ServicePaths) -> Path:
    """Write every thread's Python stack to a new logs/<name>_stacks_<epoch>.txt; its path."""
    epoch = int(time.time())
    target = paths.logs_dir / f"{paths.name}_stacks_{epoch}.txt"
    n = 1
    while target.exists():
        target = paths.logs_dir / f"{paths.name}_stacks_{epoch}_{n}.txt"
        n += 1
    tmp = paths.logs_dir / f".{target.name}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        stamp = time.strftime(LOG_TIME_FORMAT, time.gmtime(epoch))
        f.write(f"# {paths.name} service, PID {os.getpid()}, stacks of all threads at {stamp}Z\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    os.replace(tmp, target)
    return target


def run_as_program(run: Callable[[], int]) -> NoReturn:
    """Run a service's main function as a program: its exit code, or `error: ...` and the error's code."""
    try:
        code = run()
    except CryptoAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(code)


def _safe_read_pid(path: Path) -> int | None:
    try:
        return read_pid(path)
    except ValueError:
        return None
