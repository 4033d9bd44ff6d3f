"""One process that serves every deployment of prefect.yaml, with their schedules and triggers: the embedded
default instead of a work pool and its workers.

prefect.yaml stays the one place deployments are declared; this module reads it and hands each
entry's flow to a `prefect.runner.Runner` (`Runner.add_flow`, what `flow.serve()` does) with the same
name, parameters, tags, description, schedules (cron, timezone, day_or, slug), concurrency limit and
triggers (named as `prefect deploy` names them, so serving and deploying replace the same
automations). A flow run then starts in a subprocess from the flow object itself, forked from a warm
process when the setting flow_run_start is "fork" (the default): its body begins about 2 s after
the event that triggered it, polling the server every serve_poll_s (0.5 s).

Run: `python -m deployments.serve [--project-dir DIR] [--only FLOW/DEPLOYMENT ...] [--limit N]` with
PREFECT_API_URL set; SIGTERM stops it cleanly (its running flow runs are cancelled, not left
RUNNING; SIGINT would leave them so).
"""

from __future__ import annotations

import argparse
import asyncio
import copyreg
import importlib
import multiprocessing
import multiprocessing.forkserver
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


def deployment_options(entry: DeploymentEntry) -> dict[str, Any]:
    """What prefect.yaml says of one deployment, as the keyword arguments of flow.to_deployment / Runner.add_flow."""
    spec = entry.spec
    triggers: list[DeploymentTriggerTypes | TriggerTypes] = list(triggers_of(spec))
    return {
        "name": spec["name"], "schedules": schedules_of(spec), "parameters": spec.get("parameters") or {},
        "description": spec.get("description"), "tags": spec.get("tags"), "triggers": triggers,
        "concurrency_limit": concurrency_of(spec),
    }


def to_runner_deployment(entry: DeploymentEntry) -> RunnerDeployment:
    """The served form of one prefect.yaml deployment."""
    deployment = entry.flow.to_deployment(**deployment_options(entry))
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


class _ForkserverMultiprocessing:
    """prefect.flow_engine's view of `multiprocessing`: the "spawn" context it asks for is the forkserver's."""

    context = multiprocessing.context

    def __init__(self, ctx: multiprocessing.context.BaseContext) -> None:
        self._ctx = ctx

    def get_context(self, method: str | None = None) -> multiprocessing.context.BaseContext:
        return self._ctx


def fork_flow_runs(modules: list[str]) -> int:
    """Start each flow run by forking a process that has already imported Prefect and `modules` (multiprocessing's
    forkserver, started now), not by spawning a fresh interpreter that imports them again: Prefect's
    run_flow_in_subprocess asks for a "spawn" context, which costs 2.5-4 s of imports per run here, the most
    of a crash recovery's time. The flow run then starts as before (its environment and settings from this
    process, cloudpickled flow, control channel), only its interpreter is warm. The forkserver's pid."""
    import prefect.flow_engine as engine

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["prefect.flow_engine", *modules])
    multiprocessing.forkserver.ensure_running()
    engine.multiprocessing = _ForkserverMultiprocessing(ctx)  # type: ignore[assignment]
    return multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]


def _flow_by_name(module: str, attr: str) -> Flow:
    """The flow `attr` of `module`, imported (already, in a forked flow run)."""
    return getattr(importlib.import_module(module), attr)


def _reduce_flow(flow: Flow) -> str | tuple[Any, ...]:
    """Pickle a flow of an importable module by its name, like a function: pickled by value (Prefect's default
    for a flow object), its function loses the module's globals, and a parameter annotated with a name of the
    module (flows.recovery.contract.Trigger, under `from __future__ import annotations`) no longer resolves."""
    module, attr = flow.fn.__module__, flow.fn.__name__
    try:
        if _flow_by_name(module, attr) is flow:
            return _flow_by_name, (module, attr)
    except (ImportError, AttributeError):
        pass
    return flow.__reduce_ex__(4)


def serve_all(project_dir: Path = PROJECT_DIR, only: list[str] | None = None, limit: int | None = None) -> None:
    """Serve the deployments of prefect.yaml from this process until SIGTERM, ticking every serve_tick_s.

    Each flow is given to the runner as a flow object (Runner.add_flow), not as a deployment to load from
    storage: its runs then start in a subprocess from that object, instead of `python -m prefect.engine`
    importing Prefect and then the flow's module again (about 5 s per run here), and with flow_run_start
    "fork" that subprocess is forked warm."""
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    from crypto_agent.settings import load_settings

    settings = load_settings()
    entries = read_entries(project_dir, only)
    if settings.flow_run_start == "fork":
        pid = fork_flow_runs(sorted({e.flow.fn.__module__ for e in entries}))
        print(f"flow runs fork from a warm process (forkserver pid {pid})", flush=True)
    copyreg.pickle(Flow, _reduce_flow)  # this process's pickles of flows (a flow run's start) name them
    runner = Runner(pause_on_shutdown=True, limit=limit, query_seconds=settings.serve_poll_s)
    for entry in entries:
        runner.add_flow(entry.flow, **deployment_options(entry))
    print("serving:", ", ".join(e.full_name for e in entries), flush=True)
    start_ticking(settings.serve_tick_s)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as exc:
        print(f"received {type(exc).__name__}, shutting down", flush=True)


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
