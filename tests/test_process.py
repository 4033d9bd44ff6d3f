"""Process control on real processes, really signalled: start, stop, restart, clean, and never a stranger's PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from crypto_agent import health, process
from crypto_agent.daemon import FAULT_ENV
from crypto_agent.errors import InputError
from crypto_agent.process import (
    Liveness,
    NotOurProcess,
    ServiceStartError,
    ServiceStillRunning,
)
from crypto_agent.service import ServiceStateError, read_heartbeat
from crypto_agent.store import Store

try:
    from service_kit import (
        keeper,
        make_settings,
        read_lines,
        run_cli,
        seed_store,
        wait_until,
    )
except ImportError:  # tests/ became a package
    from tests.service_kit import (
        keeper,  # noqa: F401 (a fixture)
        make_settings,
        read_lines,
        run_cli,
        seed_store,
        wait_until,
    )


def kinds(settings, pid: int | None = None) -> list[str]:
    with Store(settings.database_url) as store:
        return [e["kind"] for e in health.events(store, "backtest") if pid is None or e["pid"] == pid]


def point_pidfile_at(spec, pid: int, record: dict | None) -> None:
    spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
    spec.pidfile.write_text(f"{pid}\n")
    if record is None:
        spec.pid_record.unlink(missing_ok=True)
    else:
        spec.pid_record.write_text(json.dumps(record))


class TestStart:
    def test_start_returns_once_pidfile_and_first_heartbeat_are_written(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        assert spec.pidfile.read_text().strip() == str(started.pid)
        assert read_heartbeat(spec.heartbeat).pid == started.pid
        assert started.create_time == pytest.approx(psutil.Process(started.pid).create_time(), abs=0.01)
        check = process.inspect(spec)
        assert check.state is Liveness.OURS and check.alive

    def test_a_service_that_exits_at_start_is_reported_with_its_log_and_leaves_nothing(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        with pytest.raises(ServiceStartError) as err:
            keeper.start(spec, settings, env={FAULT_ENV: "nonsense"})
        assert "exited with code 2" in err.value.message
        assert "unknown CRYPTO_AGENT_DAEMON_FAULT" in (err.value.hint or "")
        assert not spec.pidfile.exists()
        assert process.inspect(spec).state is Liveness.NO_PIDFILE

    def test_the_child_sees_exactly_the_parents_settings(self, tmp_path) -> None:
        settings = make_settings(tmp_path, symbols=["SOLUSDT", "BTCUSDT"], trader_notional_usdt=123.5)
        code = "from crypto_agent.settings import load_settings; print(load_settings().model_dump_json())"
        out = subprocess.run(
            [sys.executable, "-c", code], env=process.child_env(settings), capture_output=True, text=True,
            check=True, timeout=60,
        ).stdout
        assert json.loads(out) == json.loads(settings.model_dump_json())

    def test_an_unwritable_run_folder_is_refused_before_anything_starts(self, tmp_path, keeper) -> None:
        (tmp_path / "a-file").write_text("")
        settings = make_settings(tmp_path, run_dir=tmp_path / "a-file" / "run")
        spec = process.service_spec("backtest", settings)
        with pytest.raises(ServiceStateError, match="cannot write the backtest service's files"):
            keeper.start(spec, settings)
        out = run_cli(["daemon"], settings)
        assert out.returncode == 1 and "CRYPTO_AGENT_RUN_DIR" in out.stderr

    def test_an_unknown_service_name_is_an_input_error(self, tmp_path) -> None:
        with pytest.raises(InputError):
            process.service_spec("main.py", make_settings(tmp_path))


class TestStop:
    def test_stop_sends_sigterm_and_the_daemon_exits_0_leaving_no_state(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        result = process.stop(spec)
        assert (result.was_running, result.signal, result.exit_code) == (True, "SIGTERM", 0)
        assert not psutil.pid_exists(started.pid) or psutil.Process(started.pid).status() == psutil.STATUS_ZOMBIE
        assert not spec.pidfile.exists() and not spec.pid_record.exists()
        assert kinds(settings, started.pid) == ["started", "stopped"]
        assert process.stop(spec).was_running is False

    def test_a_hung_daemon_gets_sigkill_after_the_grace_period(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings, env={FAULT_ENV: "hang-after:2"})
        wait_until(lambda: any("hanging now" in line for line in read_lines(spec.log)), what="the hang")
        with Store(settings.database_url) as store:
            result = process.stop(spec, grace_s=1.0, store=store)
        assert (result.signal, result.exit_code) == ("SIGKILL", -signal.SIGKILL)
        assert not spec.pidfile.exists() and not spec.heartbeat.exists()
        assert kinds(settings, started.pid) == ["started", "killed"]
        with Store(settings.database_url) as store:
            assert health.crashes_within(store, "backtest", 24) == 0
            assert health.failures_within(store, "backtest", 24) == 1

    def test_a_sigstopped_daemon_still_stops_cleanly_on_sigterm(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        os.kill(started.pid, signal.SIGSTOP)
        result = process.stop(spec)
        assert (result.signal, result.exit_code) == ("SIGTERM", 0)

    def test_restart_replaces_the_process(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        first = keeper.start(spec, settings)
        stopped, second = process.restart(spec, settings)
        keeper.adopt(second.pid)
        assert stopped.pid == first.pid and stopped.exit_code == 0
        assert second.pid != first.pid and spec.pidfile.read_text().strip() == str(second.pid)


class TestNeverAStranger:
    """A pidfile naming a process we did not start is refused, and that process survives."""

    def test_a_pidfile_naming_an_unrelated_process_without_record_is_refused(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        stranger = keeper.sleeper()
        point_pidfile_at(spec, stranger.pid, None)

        for operation in (lambda: process.stop(spec), lambda: process.dump_stacks(spec, timeout_s=1),
                          lambda: process.restart(spec, settings)):
            with pytest.raises(NotOurProcess) as err:
                operation()
            assert f"refusing to signal PID {stranger.pid}" in err.value.message
            assert "no ownership record" in err.value.message
        assert stranger.poll() is None
        assert psutil.Process(stranger.pid).status() != psutil.STATUS_STOPPED
        assert health.probe(spec, settings, cpu_sample_s=0.05).status.value == "DEAD"
        assert stranger.poll() is None

    def test_a_reused_pid_is_refused_by_its_create_time(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        record = json.loads(spec.pid_record.read_text())
        os.kill(started.pid, signal.SIGKILL)
        wait_until(lambda: process.inspect(spec).state is Liveness.NOT_RUNNING, what="the daemon to die")
        # the kernel hands the PID to somebody else: same pidfile and record, another process
        stranger = keeper.sleeper()
        point_pidfile_at(spec, stranger.pid, {**record, "pid": stranger.pid})
        with pytest.raises(NotOurProcess) as err:
            process.stop(spec)
        assert "the PID was reused" in err.value.message
        assert stranger.poll() is None

    def test_a_record_copied_from_the_stranger_but_another_command_is_refused(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        stranger = keeper.sleeper()
        proc = psutil.Process(stranger.pid)
        point_pidfile_at(spec, stranger.pid, {
            "service": "trader", "pid": stranger.pid, "create_time": proc.create_time(),
            "cmdline": proc.cmdline(), "started_at": 0,
        })
        with pytest.raises(NotOurProcess, match="not 'backtest'"):
            process.stop(spec)
        assert stranger.poll() is None

    def test_the_cli_refuses_with_a_clear_message_and_exit_1(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        stranger = keeper.sleeper()
        point_pidfile_at(spec, stranger.pid, None)
        out = run_cli(["service", "stop", "backtest"], settings)
        assert out.returncode == 1
        assert out.stderr.startswith(f"error: refusing to signal PID {stranger.pid}")
        assert "what to do:" in out.stderr
        assert stranger.poll() is None


class TestCleanState:
    def test_clean_is_refused_while_the_service_runs(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings)
        with pytest.raises(ServiceStillRunning):
            process.clean_state(spec)
        assert spec.pidfile.exists()

    def test_clean_after_a_crash_removes_the_files_and_records_the_crash_once(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        os.kill(started.pid, signal.SIGKILL)
        wait_until(lambda: not process.inspect(spec).alive, what="the daemon to die")
        with Store(settings.database_url) as store:
            report = health.probe(spec, settings, cpu_sample_s=0.05)
            health.record(store, report)
            removed = process.clean_state(spec, store=store)
            assert health.crashes_within(store, "backtest", 24) == 1
        assert sorted(p.name for p in removed) == ["backtest.heartbeat", "backtest.pid", "backtest.pid.json"]
        assert process.clean_state(spec) == []

    def test_start_after_a_crash_cleans_the_stale_files_itself(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings, env={FAULT_ENV: "crash-after:1"})
        wait_until(lambda: process.inspect(spec).state is Liveness.NOT_RUNNING, what="the crash")
        assert spec.pidfile.exists()  # a crash leaves its pidfile behind
        with Store(settings.database_url) as store:
            again = keeper.start(spec, settings, store=store)
            assert health.crashes_within(store, "backtest", 24) == 1
        assert spec.pidfile.read_text().strip() == str(again.pid)
        assert any("crashing now" in line and "CRITICAL" in line for line in read_lines(spec.log))


def test_the_operator_commands_start_dump_stop_and_clean_a_service(tmp_path, keeper) -> None:
    settings = make_settings(tmp_path)
    spec = process.service_spec("backtest", settings)
    out = run_cli(["service", "start", "backtest"], settings)
    assert out.returncode == 0 and out.stdout.startswith("started backtest: PID "), out.stderr
    pid = int(spec.pidfile.read_text())
    keeper.adopt(pid)
    assert out.stdout.split("PID ")[1].split()[0] == str(pid)

    out = run_cli(["service", "dump-stacks", "backtest"], settings)
    assert out.returncode == 0 and "backtest_stacks_" in out.stdout
    assert "Current thread" in Path(out.stdout.strip()).read_text()

    out = run_cli(["service", "clean", "backtest"], settings)
    assert out.returncode == 1 and "is running" in out.stderr

    out = run_cli(["service", "stop", "backtest"], settings)
    assert out.returncode == 0 and out.stdout.startswith(f"stopped backtest (PID {pid}) with SIGTERM")
    out = run_cli(["service", "stop", "backtest"], settings)
    assert (out.returncode, out.stdout) == (0, "backtest was not running\n")
