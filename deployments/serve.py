"""One process that serves every deployment of prefect.yaml, with their schedules and triggers: the embedded
default instead of a work pool and its workers.

prefect.yaml stays the one place deployments are declared; this module reads it and hands each
entry to `prefect.serve()` as `flow.to_deployment(...)` with the same name, parameters, tags,
description, schedules (cron, timezone, day_or, slug), concurrency limit and triggers (named as
`prefect deploy` names them, so serving and deploying replace the same automations). Flow runs then
start about 1.5 s after their trigger with PREFECT_RUNNER_POLL_FREQUENCY=1.

Run: `python -m deployments.serve [--project-dir DIR] [--only FLOW/DEPLOYMENT ...] [--limit N]` with
PREFECT_API_URL set; SIGTERM stops it cleanly (its running flow runs are cancelled, not left
RUNNING; SIGINT would leave them so).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentTriggerTypes, TriggerTypes
from prefect.schedules import Cron, Schedule
from pydantic import TypeAdapter

from crypto_agent.errors import ConfigError, CryptoAgentError

PROJECT_DIR = Path(__file__).resolve().parent.parent

_TRIGGERS: TypeAdapter[DeploymentTriggerTypes] = TypeAdapter(DeploymentTriggerTypes)


@dataclass(frozen=True)
class DeploymentEntry:
    """One deployment of prefect.yaml: its flow and what the YAML says about it."""

    flow: Flow
    spec: dict[str, Any]

    @property
    def full_name(self) -> str:
        """'<flow name>/<deployment name>', as `prefect deployment run` takes it."""
        return f"{self.flow.name}/{self.spec['name']}"


def load_flow(entrypoint: str) -> Flow:
    """The flow at 'flows/daily.py:data_update', imported as a module (the project folder on sys.path)."""
    path, _, attr = entrypoint.partition(":")
    module_name = path.removesuffix(".py").replace("/", ".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"prefect.yaml entrypoint {entrypoint!r} does not import: {exc}",
                          hint="fix the entrypoint (path/to/module.py:flow_function)") from None
    if not isinstance(obj, Flow):
        raise ConfigError(f"prefect.yaml entrypoint {entrypoint!r} is not a flow", hint="point it at a @flow function")
    return obj


def read_entries(project_dir: Path = PROJECT_DIR, only: list[str] | None = None) -> list[DeploymentEntry]:
    """The deployments of prefect.yaml (those named in `only`, when given); ConfigError for an unknown name."""
    path = project_dir / "prefect.yaml"
    if not path.is_file():
        raise ConfigError(f"no prefect.yaml in {project_dir}", hint="run from a checkout of the project")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    entries = [DeploymentEntry(load_flow(d["entrypoint"]), d) for d in config.get("deployments") or []]
    if only:
        names = {e.full_name for e in entries}
        unknown = sorted(set(only) - names)
        if unknown:
            raise ConfigError(f"no deployment {', '.join(unknown)} in prefect.yaml",
                              hint=f"use <flow>/<deployment>, one of: {', '.join(sorted(names))}")
        entries = [e for e in entries if e.full_name in only]
    return entries


def schedules_of(spec: dict[str, Any]) -> list[Schedule]:
    """The YAML schedules of a deployment as Prefect schedules (cron ones: the only kind prefect.yaml uses here)."""
    out = []
    for sched in spec.get("schedules") or []:
        if "cron" not in sched:
            raise ConfigError(f"deployment {spec['name']}: only cron schedules are served, got {sched}",
                              hint="declare the schedule with cron:, timezone: and slug:")
        out.append(Cron(sched["cron"], timezone=sched.get("timezone"), day_or=sched.get("day_or", True),
                        active=sched.get("active", True), parameters=sched.get("parameters") or {},
                        slug=sched.get("slug")))
    return out


def triggers_of(spec: dict[str, Any]) -> list[DeploymentTriggerTypes]:
    """The YAML triggers of a deployment, named as `prefect deploy` names them when they have no name."""
    triggers = []
    for i, trigger in enumerate(spec.get("triggers") or [], start=1):
        trigger = dict(trigger)
        trigger.setdefault("name", f"{spec['name']}__automation_{i}")
        triggers.append(_TRIGGERS.validate_python(trigger))
    return triggers


def concurrency_of(spec: dict[str, Any]) -> int | ConcurrencyLimitConfig | None:
    """The deployment's concurrency limit: a number, or {limit, collision_strategy} as prefect.yaml allows."""
    value = spec.get("concurrency_limit")
    if isinstance(value, dict):
        return ConcurrencyLimitConfig(**value)
    return value


def to_runner_deployment(entry: DeploymentEntry) -> RunnerDeployment:
    """The served form of one prefect.yaml deployment."""
    spec = entry.spec
    triggers: list[DeploymentTriggerTypes | TriggerTypes] = list(triggers_of(spec))
    deployment = entry.flow.to_deployment(
        name=spec["name"],
        schedules=schedules_of(spec),
        parameters=spec.get("parameters") or {},
        description=spec.get("description"),
        tags=spec.get("tags"),
        triggers=triggers,
        concurrency_limit=concurrency_of(spec),
    )
    assert isinstance(deployment, RunnerDeployment)  # sync outside an event loop, as here
    return deployment


def tick_forever(interval_s: float, stop: threading.Event) -> None:
    """Emit crypto-agent.monitor.tick on the serving process's resource every `interval_s` until `stop`."""
    from flows.events import MONITOR_TICK, SERVE_RESOURCE, emit

    while not stop.is_set():
        emit(MONITOR_TICK, SERVE_RESOURCE, {"monitor": "serving-process", "pid": os.getpid(), "interval_s": interval_s})
        stop.wait(interval_s)


def start_ticking(interval_s: float) -> threading.Event:
    """The serving process's dead man's switch beat, a daemon thread; set the event returned to end it."""
    stop = threading.Event()
    threading.Thread(target=tick_forever, args=(interval_s, stop), name="serve-tick", daemon=True).start()
    return stop


def serve_all(project_dir: Path = PROJECT_DIR, only: list[str] | None = None, limit: int | None = None) -> None:
    """Serve the deployments of prefect.yaml from this process until SIGTERM, ticking every serve_tick_s."""
    from prefect import serve

    from crypto_agent.settings import load_settings

    deployments = [to_runner_deployment(e) for e in read_entries(project_dir, only)]
    start_ticking(load_settings().serve_tick_s)
    serve(*deployments, limit=limit, print_starting_message=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.serve`: serve prefect.yaml's deployments; exit 2 on a bad prefect.yaml."""
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=PROJECT_DIR, help="folder of prefect.yaml")
    parser.add_argument("--only", nargs="*", default=None, help="serve only these <flow>/<deployment>")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once (default: no limit)")
    args = parser.parse_args(argv)
    project_dir = args.project_dir.resolve()
    # Flow runs start from this folder, with flows/, blocks/ and crypto_agent/ importable.
    os.chdir(project_dir)
    if str(project_dir) not in sys.path:
        sys.path.insert(0, str(project_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(project_dir), os.environ.get("PYTHONPATH", "")) if p)
    try:
        serve_all(project_dir, args.only, args.limit)
    except CryptoAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
