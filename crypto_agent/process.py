"""Process control of the services: start, stop, restart, dump stacks, clean state; never a stranger's PID.

Every operation first decides what the pidfile points at (`inspect`): our live service, a zombie,
nothing, or somebody else's process. A signal is only ever sent to a PID whose create time and
command line match the ownership record the service wrote next to its pidfile
(`run/<name>.pid.json`), and psutil checks the create time once more as it sends. No kill by name.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydantic_settings import NoDecode
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent.errors import CryptoAgentError
from crypto_agent.holds import refuse_start
from crypto_agent.service import (
    SERVICE_MODULES,
    PidRecord,
    ServiceAlreadyRunning,
    ServicePaths,
    ensure_state_dirs,
    instance_id,
    read_heartbeat,
    read_pid,
    read_pid_record,
    record_event,
    record_mismatch,
    service_paths,
    write_atomic,
)
from crypto_agent.settings import Settings, get_settings
from crypto_agent.store import Store

log = logging.getLogger("crypto_agent.process")

KILL_WAIT_S = 5.0  # after SIGKILL, how long to wait for the kernel to take the process away


class NotOurProcess(CryptoAgentError):
    """The pidfile names a process that is not the service we started; it was not signalled."""


class ServiceNotRunning(CryptoAgentError):
    """The operation needs the service running, and it is not."""


class ServiceStillRunning(CryptoAgentError):
    """The operation needs the service gone, and it is alive."""


class ServiceStartError(CryptoAgentError):
    """The service did not come up (it exited, or wrote no heartbeat in time); nothing is left running."""


class StackDumpTimeout(CryptoAgentError):
    """The service did not write its stacks after SIGUSR1 within the time allowed."""


# Process control's names for the one description of a service's files (crypto_agent.service).
ServiceSpec = ServicePaths
service_spec = service_paths


# --- what the pidfile points at ---


class Liveness(str, enum.Enum):
    """What a service's pidfile points at."""

    NO_PIDFILE = "no-pidfile"
    INVALID_PIDFILE = "invalid-pidfile"
    NOT_RUNNING = "not-running"
    ZOMBIE = "zombie"
    FOREIGN = "foreign"  # a live process that is not the instance that wrote the pidfile
    OURS = "ours"


@dataclass(frozen=True)
class ProcessCheck:
    """The answer of `inspect`: the state, the PID, our process when it is ours, and why."""

    state: Liveness
    pid: int | None
    reason: str
    record: PidRecord | None = None
    process: psutil.Process | None = field(default=None, compare=False)

    @property
    def alive(self) -> bool:
        """Whether the service itself is running (a stopped, SIGSTOP-ed process counts as alive)."""
        return self.state is Liveness.OURS

    @property
    def crashed_instance(self) -> str | None:
        """The instance that died without a clean stop, when the pidfile and its record say which."""
        if self.state in (Liveness.NOT_RUNNING, Liveness.ZOMBIE, Liveness.FOREIGN) and self.pid is not None:
            if self.record is not None and self.record.pid == self.pid:
                return self.record.instance
            if self.state is not Liveness.FOREIGN:
                return instance_id(self.pid, None)
        return None


# Children this process started, so their exit is reaped (no zombies) and their exit code known.
_CHILDREN: dict[int, subprocess.Popen] = {}


def reap_children() -> None:
    """Reap the children this process started that have exited (a long-running keeper calls it each look)."""
    for pid, popen in list(_CHILDREN.items()):
        if popen.poll() is not None:
            del _CHILDREN[pid]


def inspect(spec: ServiceSpec) -> ProcessCheck:
    """Decide what the pidfile points at: nothing, a dead or zombie process, a stranger, or our service."""
    try:
        pid = read_pid(spec.pidfile)
    except ValueError as exc:
        return ProcessCheck(Liveness.INVALID_PIDFILE, None, f"PID file empty or invalid ({exc})")
    if pid is None:
        return ProcessCheck(Liveness.NO_PIDFILE, None, "No PID file")
    record = read_pid_record(spec.pid_record)
    popen = _CHILDREN.get(pid)
    if popen is not None and popen.poll() is not None:
        del _CHILDREN[pid]
    try:
        proc = psutil.Process(pid)
        status = proc.status()
    except psutil.NoSuchProcess:
        return ProcessCheck(Liveness.NOT_RUNNING, pid, f"Process {pid} not running", record)
    except psutil.AccessDenied:
        return ProcessCheck(Liveness.FOREIGN, pid, f"Process {pid} belongs to another user", record)
    if status == psutil.STATUS_ZOMBIE:
        return ProcessCheck(Liveness.ZOMBIE, pid, f"Process {pid} not running (zombie)", record)
    if record is None:
        return ProcessCheck(
            Liveness.FOREIGN, pid,
            f"Process {pid} cannot be proven to be the {spec.name} service: "
            f"no ownership record {spec.pid_record}",
        )
    mismatch = record_mismatch(record, proc)
    if mismatch is not None and _exiting_instance(proc, record):
        return ProcessCheck(Liveness.NOT_RUNNING, pid, f"Process {pid} not running (exiting)", record)
    if record.service != spec.name:
        mismatch = mismatch or f"the ownership record is of service {record.service!r}, not {spec.name!r}"
    if mismatch is not None:
        return ProcessCheck(
            Liveness.FOREIGN, pid, f"Process {pid} is not the {spec.name} service ({mismatch})", record
        )
    return ProcessCheck(Liveness.OURS, pid, f"PID {pid}", record, proc)


def _exiting_instance(proc: psutil.Process, record: PidRecord) -> bool:
    """Whether proc is the recorded instance caught while the kernel tears it down (its command line gone)."""
    try:
        return abs(proc.create_time() - record.create_time) <= 0.05 and not proc.cmdline()
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def owned_process(spec: ServiceSpec) -> psutil.Process:
    """Our live service process; ServiceNotRunning when there is none, NotOurProcess for a stranger's PID."""
    check = inspect(spec)
    if check.state is Liveness.OURS and check.process is not None:
        return check.process
    if check.state is Liveness.FOREIGN:
        raise NotOurProcess(
            f"refusing to signal PID {check.pid}: {check.reason}",
            hint=f"the pidfile {spec.pidfile} is stale; if the {spec.name} service is gone, "
            f"`crypto-agent service clean {spec.name}` removes its state files (it signals nothing)",
        )
    raise ServiceNotRunning(
        f"the {spec.name} service is not running: {check.reason}",
        hint=f"start it with `crypto-agent service start {spec.name}`",
    )


# --- the operations ---


@dataclass(frozen=True)
class StartResult:
    """A started service: its PID and create time, and how long it took to write its first heartbeat."""

    name: str
    pid: int
    create_time: float
    elapsed_s: float
    log: Path
    cleaned: list[Path]


@dataclass(frozen=True)
class StopResult:
    """How a stop went: whether it ran, the last signal it took, its exit code when known, the files cleaned."""

    name: str
    pid: int | None
    was_running: bool
    signal: str | None
    exit_code: int | None
    elapsed_s: float
    cleaned: list[Path]


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment plus every setting as CRYPTO_AGENT_<FIELD>, so the child sees exactly `settings`.

    A setting that is None is left out (the environment cannot say None), so the child sees the
    field's default there.
    """
    env = dict(os.environ)
    for name, info in type(settings).model_fields.items():
        value = getattr(settings, name)
        key = f"CRYPTO_AGENT_{name.upper()}"
        if value is None:
            env.pop(key, None)
            continue
        if name == "database_url" and value == f"sqlite:///{settings.db_path}":
            env.pop(key, None)  # derived from db_path, which goes over resolved
            continue
        env[key] = _env_value(value, any(m is NoDecode or isinstance(m, NoDecode) for m in info.metadata))
    if extra:
        env.update(extra)
    return env


def _env_value(value: Any, comma_list: bool) -> str:
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)) and comma_list:
        return ",".join(str(v) for v in value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    return str(value)


def start(
    spec: ServiceSpec,
    settings: Settings | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    store: Store | None = None,
) -> StartResult:
    """Start the service detached (own session, output to its log); return once it wrote its pidfile and a heartbeat.

    ServiceAlreadyRunning when it runs; ServicePaused when a hold is in force (crypto_agent.holds; an
    ended one does not count); the state files of a dead instance are cleaned first (and its
    crash recorded when `store` is given). ServiceStartError, with the end of its log, when it exits
    or stays silent past the timeout (it is then killed: it is our child).
    """
    settings = settings or get_settings()
    timeout_s = spec.start_timeout_s if timeout_s is None else timeout_s
    ensure_state_dirs(spec)
    check = inspect(spec)
    if check.alive:
        raise ServiceAlreadyRunning(
            f"the {spec.name} service is already running (PID {check.pid})",
            hint=f"`crypto-agent service restart {spec.name}` to restart it",
        )
    refuse_start(spec)  # a hold in force (a rollback's, an operator's, the window guard's) keeps it down
    cleaned = _clean_files(spec, check, store) if check.state is not Liveness.NO_PIDFILE else []
    started = time.monotonic()
    with open(spec.log, "ab") as out:
        popen = subprocess.Popen(
            spec.command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=child_env(settings, env),
        )
    _CHILDREN[popen.pid] = popen
    if spec.niceness > 0:
        try:
            child = psutil.Process(popen.pid)
            if child.nice() < spec.niceness:
                child.nice(spec.niceness)
        except psutil.Error:
            pass  # the service sets its own niceness as well
    deadline = started + timeout_s
    while True:
        code = popen.poll()
        if code is not None:
            _CHILDREN.pop(popen.pid, None)
            _record_start_failure(store, spec, popen.pid, f"exited with code {code}")
            raise ServiceStartError(
                f"the {spec.name} service exited with code {code} before its first heartbeat",
                hint=f"its log {spec.log} ends with:\n{tail_text(spec.log)}",
            )
        if _is_up(spec, popen.pid):
            break
        if time.monotonic() > deadline:
            popen.kill()
            popen.wait(KILL_WAIT_S)
            _CHILDREN.pop(popen.pid, None)
            _record_start_failure(store, spec, popen.pid, f"no heartbeat within {timeout_s:g} s")
            raise ServiceStartError(
                f"the {spec.name} service wrote no pidfile and heartbeat within {timeout_s:g} s; it was killed",
                hint=f"raise start_timeout_s if the machine is slow; its log {spec.log} ends with:\n"
                f"{tail_text(spec.log)}",
            )
        time.sleep(0.05)
    record = read_pid_record(spec.pid_record)
    create_time = record.create_time if record is not None and record.pid == popen.pid else 0.0
    return StartResult(spec.name, popen.pid, create_time, time.monotonic() - started, spec.log, cleaned)


def _is_up(spec: ServiceSpec, pid: int) -> bool:
    try:
        if read_pid(spec.pidfile) != pid:
            return False
        beat = read_heartbeat(spec.heartbeat)
    except ValueError:
        return False
    return beat is not None and beat.pid == pid


def stop(spec: ServiceSpec, *, grace_s: float | None = None, store: Store | None = None) -> StopResult:
    """SIGTERM our service, wait up to the grace period, then SIGKILL; clean its state files.

    Nothing to do when it does not run (stale files are cleaned, the crash recorded with `store`);
    NotOurProcess, with nothing signalled, when the pidfile names another process.
    """
    grace_s = spec.stop_grace_s if grace_s is None else grace_s
    started = time.monotonic()
    check = inspect(spec)
    if check.state is Liveness.FOREIGN:
        owned_process(spec)  # raises NotOurProcess with the operator's message
    if not check.alive or check.process is None:
        cleaned = _clean_files(spec, check, store) if check.state is not Liveness.NO_PIDFILE else []
        return StopResult(spec.name, check.pid, False, None, None, time.monotonic() - started, cleaned)
    proc = check.process
    popen = _CHILDREN.get(proc.pid)
    last_signal = "SIGTERM"
    try:
        proc.send_signal(signal.SIGTERM)  # psutil re-checks the create time before sending
        proc.send_signal(signal.SIGCONT)  # a SIGSTOP-ed service must run to honour SIGTERM
    except psutil.NoSuchProcess:
        pass
    gone, code = _wait_gone(proc, popen, grace_s)
    if not gone:
        last_signal = "SIGKILL"
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
        gone, code = _wait_gone(proc, popen, KILL_WAIT_S)
        if store is not None and check.record is not None:
            _safe_record(store, spec.name, "killed", check.record.pid, check.record.instance,
                         f"did not stop within {grace_s:g} s of SIGTERM; SIGKILL sent")
        if not gone:
            raise CryptoAgentError(
                f"PID {proc.pid} of the {spec.name} service survived SIGKILL for {KILL_WAIT_S:g} s",
                hint="it is probably in uninterruptible I/O (state D); check `ps -o stat -p "
                f"{proc.pid}` and the disk",
            )
    _CHILDREN.pop(proc.pid, None)
    cleaned = _remove_state_files(spec, only_if_pid=proc.pid)
    return StopResult(spec.name, proc.pid, True, last_signal, code, time.monotonic() - started, cleaned)


def _wait_gone(proc: psutil.Process, popen: subprocess.Popen | None, timeout_s: float) -> tuple[bool, int | None]:
    """Wait until the process is gone; (gone, exit code when it was our child)."""
    if popen is not None:
        try:
            return True, popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False, None
    # not our child: its parent reaps it, maybe late, so a zombie counts as gone
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True, None
        except psutil.NoSuchProcess:
            return True, None
        if time.monotonic() >= deadline:
            return False, None
        time.sleep(0.02)


def restart(
    spec: ServiceSpec,
    settings: Settings | None = None,
    *,
    grace_s: float | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    store: Store | None = None,
) -> tuple[StopResult, StartResult]:
    """Stop (if it runs) then start; NotOurProcess, with nothing done, when the pidfile names a stranger."""
    stopped = stop(spec, grace_s=grace_s, store=store)
    return stopped, start(spec, settings, env=env, timeout_s=timeout_s, store=store)


def dump_stacks(spec: ServiceSpec, *, timeout_s: float = 10.0) -> Path:
    """Ask our service (SIGUSR1) to write every thread's stack under logs/; the new file's path."""
    proc = owned_process(spec)
    before = set(spec.logs_dir.glob(spec.stacks_glob))
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = sorted(set(spec.logs_dir.glob(spec.stacks_glob)) - before)
        if new:
            return new[-1]
        time.sleep(0.05)
    status = _status_or_gone(proc)
    raise StackDumpTimeout(
        f"the {spec.name} service (PID {proc.pid}, state {status}) wrote no stack dump within {timeout_s:g} s",
        hint="a stopped (SIGSTOP) process answers after SIGCONT; one blocked inside C code answers only "
        f"when it returns to Python: try `py-spy dump --pid {proc.pid}` if py-spy is installed",
    )


def clean_state(spec: ServiceSpec, store: Store | None = None) -> list[Path]:
    """Remove the pidfile, its ownership record and the heartbeat of a service that is gone; the paths removed.

    ServiceStillRunning when our service is alive. Signals nothing. A pidfile left by an instance
    that did not stop cleanly is recorded as its crash, when `store` is given.
    """
    check = inspect(spec)
    if check.alive:
        raise ServiceStillRunning(
            f"the {spec.name} service is running (PID {check.pid}); its state files stay",
            hint=f"stop it first: `crypto-agent service stop {spec.name}`",
        )
    return _clean_files(spec, check, store)


def _clean_files(spec: ServiceSpec, check: ProcessCheck, store: Store | None) -> list[Path]:
    instance = check.crashed_instance
    if store is not None and instance is not None and check.pid is not None:
        _safe_record(store, spec.name, "crashed", check.pid, instance, f"found dead: {check.reason}")
    return _remove_state_files(spec)


def _remove_state_files(spec: ServiceSpec, only_if_pid: int | None = None) -> list[Path]:
    if only_if_pid is not None:
        try:
            if read_pid(spec.pidfile) not in (only_if_pid, None):
                return []  # a new instance already owns the files
        except ValueError:
            pass
    removed = []
    for path in (spec.pidfile, spec.pid_record, spec.heartbeat):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _record_start_failure(store: Store | None, spec: ServiceSpec, pid: int, detail: str) -> None:
    if store is not None:
        _safe_record(store, spec.name, "start-failed", pid, instance_id(pid, time.time()), detail)


def _safe_record(store: Store, service: str, kind: str, pid: int, instance: str, detail: str) -> None:
    try:
        record_event(store, service, kind, pid=pid, instance=instance, source="process-control", detail=detail)
    except SQLAlchemyError as exc:  # bookkeeping must never stop a recovery
        log.warning("the %s event of %s PID %d was not recorded: %s", kind, service, pid, exc)


def _status_or_gone(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.Error:
        return "gone"


def tail_text(path: Path, lines: int = 20, max_bytes: int = 16_384) -> str:
    """The last lines of a text file (empty when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# --- children that write no pidfile of their own: the stack's simulator, receiver, Prefect server ... (issue 6) ---

CHILD_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def child_spec(
    name: str,
    command: tuple[str, ...] | list[str] = (),
    settings: Settings | None = None,
    *,
    stop_grace_s: float | None = None,
    start_timeout_s: float | None = None,
) -> ServiceSpec:
    """The spec of a child process that writes no pidfile itself: `start_child` records its PID and identity.

    Its files are run/<name>.pid and run/<name>.pid.json and its log logs/<name>.log; the same
    ownership rule as for the services applies to every signal (`stop`, `inspect`).
    """
    if name in SERVICE_MODULES or not name or not set(name) <= CHILD_NAME_CHARS:
        raise CryptoAgentError(
            f"invalid child process name {name!r}",
            hint="lower-case letters, digits and dashes, and not a service name (backtest, trader)",
        )
    settings = settings or get_settings()
    run_dir, logs_dir = Path(settings.run_dir), Path(settings.logs_dir)
    return ServiceSpec(
        name=name,
        command=tuple(command),
        pidfile=run_dir / f"{name}.pid",
        pid_record=run_dir / f"{name}.pid.json",
        heartbeat=run_dir / f"{name}.heartbeat",  # never written: readiness is the caller's check
        lock=run_dir / f"{name}.lock",  # never taken: start_child records the PID itself
        log=logs_dir / f"{name}.log",
        logs_dir=logs_dir,
        niceness=0,
        stop_grace_s=settings.stop_grace_s if stop_grace_s is None else stop_grace_s,
        start_timeout_s=settings.start_timeout_s if start_timeout_s is None else start_timeout_s,
    )


def start_child(
    spec: ServiceSpec,
    *,
    env: dict[str, str],
    ready: Callable[[], bool],
    cwd: Path | None = None,
    timeout_s: float | None = None,
) -> StartResult:
    """Start `spec.command` detached (own session, output to its log) with exactly `env`; record its PID and
    identity; return once `ready()` is true.

    ServiceAlreadyRunning when our instance runs; ServiceStartError, with the end of its log, when it
    exits first or `ready()` stays false past the timeout (it is then killed: it is our child).
    """
    timeout_s = spec.start_timeout_s if timeout_s is None else timeout_s
    for folder in (spec.pidfile.parent, spec.logs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    check = inspect(spec)
    if check.alive:
        raise ServiceAlreadyRunning(
            f"the {spec.name} process is already running (PID {check.pid})",
            hint="`crypto-agent down` stops the stack",
        )
    cleaned = _remove_state_files(spec) if check.state is not Liveness.NO_PIDFILE else []
    started = time.monotonic()
    with open(spec.log, "ab") as out:
        popen = subprocess.Popen(
            spec.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=env, cwd=cwd,
        )
    _CHILDREN[popen.pid] = popen
    try:
        proc = psutil.Process(popen.pid)
        create_time, cmdline = proc.create_time(), _exec_cmdline(proc)
        record = {"service": spec.name, "pid": popen.pid, "create_time": create_time,
                  "cmdline": cmdline, "started_at": time.time()}
        write_atomic(spec.pid_record, json.dumps(record))
        write_atomic(spec.pidfile, f"{popen.pid}\n")
    except psutil.NoSuchProcess:
        create_time = 0.0  # it died at once; the poll below reports it
    deadline = started + timeout_s
    while True:
        code = popen.poll()
        if code is not None:
            _CHILDREN.pop(popen.pid, None)
            _remove_state_files(spec, only_if_pid=popen.pid)
            raise ServiceStartError(
                f"the {spec.name} process exited with code {code} before it was ready",
                hint=f"its log {spec.log} ends with:\n{tail_text(spec.log)}",
            )
        if ready():
            break
        if time.monotonic() > deadline:
            popen.kill()
            popen.wait(KILL_WAIT_S)
            _CHILDREN.pop(popen.pid, None)
            _remove_state_files(spec, only_if_pid=popen.pid)
            raise ServiceStartError(
                f"the {spec.name} process was not ready within {timeout_s:g} s; it was killed",
                hint=f"its log {spec.log} ends with:\n{tail_text(spec.log)}",
            )
        time.sleep(0.1)
    return StartResult(spec.name, popen.pid, create_time, time.monotonic() - started, spec.log, cleaned)


def _exec_cmdline(proc: psutil.Process, timeout_s: float = 5.0) -> list[str]:
    """The command line of a child just started: Popen returns as the exec closes its fds, a moment before
    the kernel publishes the new arguments, and an empty command line read then would never match again."""
    deadline = time.monotonic() + timeout_s
    while True:
        cmdline = proc.cmdline()
        if cmdline or time.monotonic() > deadline:
            return cmdline
        time.sleep(0.005)


def stop_tree(spec: ServiceSpec, *, grace_s: float | None = None, store: Store | None = None) -> StopResult:
    """`stop`, then SIGTERM (and SIGKILL) what the process had started in its session and left behind.

    The descendants are psutil handles taken while our process was proven ours, and psutil checks
    each one's create time as it signals, so a reused PID is never touched. A descendant in a session
    of its own is a service started detached on purpose (a recovery restarting the daemon): left alone.
    """
    check = inspect(spec)
    descendants: list[psutil.Process] = []
    if check.alive and check.process is not None:
        try:
            descendants = [p for p in check.process.children(recursive=True) if _session(p) == _session(check.process)]
        except psutil.Error:
            pass
    result = stop(spec, grace_s=grace_s, store=store)
    left = [p for p in descendants if _alive(p)]
    for proc in left:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(left, timeout=KILL_WAIT_S)
    for proc in still:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=KILL_WAIT_S)
    return result


def _session(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_event_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> threading.Event:
    """An event set when one of `signals` arrives: the stop of a long-running loop (the relay, the keeper)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    for sig in signals:
        signal.signal(sig, on_signal)
    return stop
