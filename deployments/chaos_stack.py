"""The stack a chaos drill acts on: what `crypto-agent up` recorded, a Prefect client on its API, its flow runs.

deployments/chaos.py's DrillRunner builds on StackRuns: it runs a scheduled check's deployment now,
as its schedule would, and waits for the flow runs it started.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from crypto_agent.errors import ConfigError, CryptoAgentError
from crypto_agent.settings import Settings

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POLL_S = 1.0
FLOW_RUN_S = 180.0  # a check the drill runs (monitor, validation, integrity) must end within this


class ChaosFailed(CryptoAgentError):
    """A drill did not recover (or was not even detected) in time."""


@dataclass(frozen=True)
class StackTarget:
    """The running stack: its settings and what `up` recorded (Prefect API and UI, project folder)."""

    settings: Settings
    api_url: str
    ui_url: str
    project_dir: Path

    def flow_run_url(self, flow_run_id: str | UUID) -> str:
        """A flow run's page in the Prefect UI."""
        return f"{self.ui_url}/runs/flow-run/{flow_run_id}"

    def artifact_url(self, key: str) -> str:
        """An artifact's page (its latest version) in the Prefect UI."""
        return f"{self.ui_url}/artifacts/key/{key}"


def find_stack(settings: Settings) -> StackTarget:
    """The stack `crypto-agent up` started for these settings; ConfigError when there is none or it does not answer."""
    from deployments.stack import read_record

    record = read_record(settings)
    if record is None:
        raise ConfigError(
            f"no running stack here: {Path(settings.run_dir) / 'stack.json'} does not exist",
            hint="bring it up first (`crypto-agent up --detach`), with the same CRYPTO_AGENT_HOME and settings",
        )
    if Path(record.get("db_path", "")) != Path(settings.db_path):
        raise ConfigError(
            f"the stack recorded in {Path(settings.run_dir) / 'stack.json'} uses the store {record.get('db_path')}, "
            f"these settings {settings.db_path}",
            hint="run `crypto-agent chaos` with the settings (environment, crypto-agent.toml) `up` was run with",
        )
    api_url = str(record["api_url"])
    try:
        healthy = httpx.get(f"{api_url}/health", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        healthy = False
    if not healthy:
        raise ConfigError(f"the stack's Prefect server at {api_url} does not answer",
                          hint="`crypto-agent up --detach` brings the stack (back) up")
    return StackTarget(settings, api_url, str(record.get("ui_url") or api_url.removesuffix("/api")),
                       Path(record.get("project_dir") or Path(__file__).resolve().parent.parent))


@contextmanager
def prefect_api(target: StackTarget) -> Iterator[Any]:
    """A sync Prefect client on the stack's API (whatever PREFECT_API_URL this terminal has)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: target.api_url}), get_client(sync_client=True) as client:
        yield client


class StackRuns:
    """The flow runs of one stack: run a deployment now, read a run's state, wait for it to end."""

    def __init__(self, target: StackTarget, client: Any) -> None:
        self.target = target
        self.client = client
        self._deployment_ids: dict[str, UUID] = {}

    def run_deployment(self, name: str, parameters: dict[str, Any] | None = None) -> UUID:
        """Create a flow run of deployment `name` now (the serving process picks it up); its id."""
        if name not in self._deployment_ids:
            from prefect.exceptions import ObjectNotFound

            try:
                self._deployment_ids[name] = self.client.read_deployment_by_name(name).id
            except ObjectNotFound:
                raise ChaosFailed(f"deployment {name} is not on the stack's server",
                                  hint="`crypto-agent up` deploys every deployment of prefect.yaml") from None
        run = self.client.create_flow_run_from_deployment(self._deployment_ids[name], parameters=parameters or {},
                                                          tags=["chaos-drill"])
        return run.id

    def flow_run_state(self, flow_run_id: UUID) -> str:
        """The state type of a flow run (SCHEDULED, RUNNING, COMPLETED ...)."""
        run = self.client.read_flow_run(flow_run_id)
        return run.state_type.value if run.state_type is not None else "PENDING"

    def wait_flow_run(self, flow_run_id: UUID, what: str) -> str:
        """Wait until a flow run the drill started ends; its final state type."""
        deadline = time.monotonic() + FLOW_RUN_S
        while True:
            state = self.flow_run_state(flow_run_id)
            if state in TERMINAL:
                return state
            if time.monotonic() > deadline:
                raise ChaosFailed(f"{what} (flow run {self.target.flow_run_url(flow_run_id)}) did not end within "
                                  f"{FLOW_RUN_S:g} s (still {state})",
                                  hint="is the serving process running? its log is logs/serve.log")
            time.sleep(POLL_S)

    def flow_run_label(self, flow_run_id: str | None) -> str:
        """"<flow>/<deployment> run '<name>'" for the flow run an incident names."""
        from prefect.exceptions import PrefectException

        if not flow_run_id:
            return "(no flow run recorded)"
        try:
            run = self.client.read_flow_run(UUID(flow_run_id))
            flow = self.client.read_flow(run.flow_id)
            return f"{flow.name} run '{run.name}'"
        except (ValueError, httpx.HTTPError, PrefectException):  # a nicety: the URL printed later is what matters
            return f"flow run {flow_run_id}"
