"""`crypto-agent blocks-register` and `crypto-agent deploy` (deployments/cli.py) against the test server."""

from __future__ import annotations

import pytest
import typer
from prefect import get_client
from typer.testing import CliRunner

from blocks.escalation import DEFAULT_ESCALATION, Escalation
from crypto_agent.receiver import Receiver
from deployments.cli import register


@pytest.fixture
def cli() -> typer.Typer:
    """A fresh app with only the Prefect-side commands, as the entry point adds them to crypto-agent."""
    app = typer.Typer(no_args_is_help=True, add_completion=False)

    @app.callback()
    def _root() -> None:
        """Test app."""

    register(app)
    return app


def test_blocks_register_creates_the_default_escalation_on_the_configured_receiver(
    cli: typer.Typer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRYPTO_AGENT_RECEIVER_URL", receiver.url)
    done = CliRunner().invoke(cli, ["blocks-register"])
    assert done.exit_code == 0, done.output
    assert "saved crypto-agent-escalation/crypto-agent" in done.output
    assert "skipped secret/fred-api-key" in done.output
    assert Escalation.load(DEFAULT_ESCALATION).channel("l3").url == f"{receiver.url}/l3"


def test_deploy_creates_the_pool_and_every_deployment_with_its_schedule(cli: typer.Typer) -> None:
    done = CliRunner().invoke(cli, ["deploy"])
    assert done.exit_code == 0, done.output
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("crypto-agent-pool")
        deployments = client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
    assert pool.type == "process"
    by_name = {f"{flows[d.flow_id]}/{d.name}": d for d in deployments}
    assert {
        "data-update/daily", "data-update-deadline/daily", "data-validation/daily", "sentiment-macro-update/daily",
        "backup/daily", "compact/weekly", "backup-restore-test/monthly", "integrity-check/quick",
        "integrity-check/full",
    } <= set(by_name)
    monthly = by_name["backup-restore-test/monthly"]
    [schedule] = monthly.schedules
    assert schedule.slug == "backup-restore-test-first-sunday"
    assert schedule.schedule.day_or is False and schedule.schedule.timezone == "UTC"
    assert by_name["integrity-check/full"].parameters == {"full": True}
    assert all(d.work_pool_name == "crypto-agent-pool" for d in by_name.values())
    # a second deploy replaces them, it does not add more
    again = CliRunner().invoke(cli, ["deploy"])
    assert again.exit_code == 0, again.output
    with get_client(sync_client=True) as client:
        assert len(client.read_deployments()) == len(deployments)


def test_deploy_from_a_folder_without_prefect_yaml_is_a_clear_error(cli: typer.Typer, tmp_path) -> None:
    done = CliRunner().invoke(cli, ["deploy", "--project-dir", str(tmp_path)])
    assert done.exit_code != 0
    assert "no prefect.yaml" in str(done.exception)
