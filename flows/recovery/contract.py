"""What every recovery flow is, declared once: the @flow with the hooks that close its incident, and its parameters.

The contract with prefect.yaml's triggers and deployments/automations.py: a recovery takes `service`
(crypto_agent's service name; the store scenarios ignore it), `event` (the triggering event as the
automation passes it: id, event, occurred, resource, payload), `settings` (overrides) and `handover`
(internal: the incident and the concurrency limits a parent recovery hands over), and returns its summary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import Flow, flow

from flows.recovery.skeleton import RECOVERY_CRASH_HOOKS, RECOVERY_FAILURE_HOOKS

P = ParamSpec("P")
R = TypeVar("R")

Trigger = dict[str, Any] | None  # the triggering event: id, event, occurred, resource, payload
Overrides = dict[str, Any] | None  # settings overrides, as the flows' `settings` parameter takes them
Handover = dict[str, Any] | None  # internal: {incident_id, held} from the recovery that hands over
Summary = dict[str, Any]  # what a recovery returns: {incident_id, scenario, status, outcome, summary, ...}


def recovery_flow(
    name: str, description: str | None, *, timeout_seconds: float
) -> Callable[[Callable[P, R]], Flow[P, R]]:
    """The @flow of a recovery: its runbook name and description, its time budget, and the hooks that close the
    incident its run leaves open when it fails or crashes (then tell L1)."""
    return flow(name=name, description=description, timeout_seconds=timeout_seconds,
                on_failure=RECOVERY_FAILURE_HOOKS, on_crashed=RECOVERY_CRASH_HOOKS)
