"""The five recovery deployments in prefect.yaml: `<flow>/auto`, no schedule, parameters the flow takes,
and every flow carrying the contract's parameters, hooks and a timeout."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow

import flows.recovery as recovery_flows
from flows.notify import notify_crashed, notify_failure

PROJECT_DIR = Path(__file__).resolve().parents[2]
RECOVERY_FLOWS = ["recover-daemon-crash", "recover-stale-data", "recover-db-corruption", "recover-process-hang",
                  "rollback-persistent-failures"]


def _flow(entrypoint: str) -> Flow:
    path, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def _recovery_deployments() -> dict[str, dict[str, Any]]:
    deployments = yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())["deployments"]
    return {_flow(d["entrypoint"]).name: d for d in deployments if d["entrypoint"].startswith("flows/recovery/")}


def test_each_recovery_flow_is_deployed_once_as_auto_without_a_schedule() -> None:
    found = _recovery_deployments()
    defined = sorted(o.name for o in vars(recovery_flows).values() if isinstance(o, Flow))
    assert sorted(found) == sorted(RECOVERY_FLOWS) == defined
    for name, dep in found.items():
        assert dep["name"] == "auto", name
        assert not dep.get("schedules"), f"{name} runs from automations, not on a schedule"
        assert dep["work_pool"]["name"] == "crypto-agent-pool"
        assert "recovery" in dep["tags"]
        _flow(dep["entrypoint"]).validate_parameters(dep.get("parameters") or {})


@pytest.mark.parametrize("name", RECOVERY_FLOWS)
def test_every_recovery_flow_takes_the_contract_parameters_and_tells_people_when_it_breaks(name: str) -> None:
    flow = _flow(_recovery_deployments()[name]["entrypoint"])
    params = inspect.signature(flow.fn).parameters
    assert list(params)[:3] == ["service", "event", "settings"]
    assert params["service"].default == "backtest" and params["event"].default is None
    assert notify_failure in flow.on_failure_hooks and notify_crashed in flow.on_crashed_hooks
    assert recovery_flows.close_incidents_of_run in flow.on_failure_hooks
    assert recovery_flows.close_incidents_of_run in flow.on_crashed_hooks
    assert flow.timeout_seconds and flow.timeout_seconds <= 3 * 3600
    # the automation passes the event as a dict, with the payload a dict of its own
    flow.validate_parameters({"service": "trader", "settings": {"home": "/tmp"},
                              "event": {"id": "x", "event": "crypto-agent.store.stale", "payload": {"a": 1}}})
