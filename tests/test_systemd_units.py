"""The production systemd units in deploy/systemd: each one starts a command this project really has, keeps it
alive (or is run by its timer), and reads its settings from the one environment file."""

from __future__ import annotations

import configparser
import importlib.util
import shlex
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))


def unit(path: Path) -> configparser.ConfigParser:
    """A unit file as sections of keys (systemd's syntax is close enough to INI for these files)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def test_the_units_and_the_timer_are_there() -> None:
    names = {p.name for p in UNITS.iterdir()}
    assert {"crypto-agent-server.service", "crypto-agent-worker.service", "crypto-agent-relay.service",
            "crypto-agent-watchdog.service", "crypto-agent-watchdog.timer"} <= names


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_each_service_runs_a_real_command_from_the_env_file(path: Path) -> None:
    service = unit(path)["Service"]
    assert service["EnvironmentFile"] == "/etc/crypto-agent/env"
    argv = shlex.split(service["ExecStart"])
    program = Path(argv[0]).name
    if program == "python":
        assert argv[1] == "-m" and importlib.util.find_spec(argv[2]) is not None, argv
    elif program == "crypto-agent":
        from typer.main import get_command

        from crypto_agent.cli import app

        assert argv[1] in get_command(app).commands, argv  # type: ignore[attr-defined]
    else:
        assert program == "prefect" and argv[1] in ("server", "worker"), argv
    if service.get("Type") == "oneshot":
        assert path.stem == "crypto-agent-watchdog"
    else:  # kept alive by systemd, stopped with SIGTERM (SIGINT would leave flow runs RUNNING)
        assert service["Restart"] == "always" and service["KillSignal"] == "SIGTERM"
        assert int(unit(path)["Unit"]["StartLimitBurst"]) >= 3


def test_the_timer_runs_the_watchdog_every_minute() -> None:
    timer = unit(UNITS / "crypto-agent-watchdog.timer")["Timer"]
    assert (UNITS / timer["Unit"]).is_file() and timer["OnUnitActiveSec"] == "1min"
