"""Commands of the Prefect side, joined to `crypto-agent` through the entry point group "crypto_agent.cli".

`crypto-agent blocks-register` registers the Block types and writes the default Block documents;
`crypto-agent deploy` creates the process work pool if missing and runs `prefect deploy --all` on
prefect.yaml; `crypto-agent up` / `down` bring the whole stack up and stop it (deployments/stack/).
Prefect is imported inside the commands, so `crypto-agent --help` stays fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import typer

from crypto_agent.errors import ConfigError, CryptoAgentError, InputError

PROJECT_DIR = Path(__file__).resolve().parent.parent
WORK_POOL = "crypto-agent-pool"
PROJECT_DIR_ENV = "CRYPTO_AGENT_PROJECT_DIR"
BLOCK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # what Prefect accepts as a block document's name


class DeployFailed(CryptoAgentError):
    """`prefect deploy` did not deploy every deployment of prefect.yaml."""


def prefect_env(project_dir: Path) -> dict[str, str]:
    """The environment of a `prefect` subprocess: ours, the Prefect API this process uses, the project folder."""
    from prefect.settings import get_current_settings

    env = dict(os.environ)
    api_url = get_current_settings().api.url
    if api_url:
        env["PREFECT_API_URL"] = str(api_url)
    env[PROJECT_DIR_ENV] = str(project_dir)
    # `flows`, `blocks` and `crypto_agent` must import in the subprocess even when not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project_dir), env.get("PYTHONPATH", "")) if p)
    return env


def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool `name` unless it exists; True when it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def deploy_all(project_dir: Path = PROJECT_DIR, pool: str = WORK_POOL, timeout_s: float = 600) -> str:
    """Create the work pool if needed and deploy every deployment of prefect.yaml; the command's output."""
    if not (project_dir / "prefect.yaml").is_file():
        raise ConfigError(
            f"no prefect.yaml in {project_dir}",
            hint="run from a checkout of the project, or pass --project-dir",
        )
    ensure_work_pool(pool)
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    if pool != WORK_POOL:
        cmd += ["--pool", pool]
    try:
        done = subprocess.run(
            cmd, cwd=project_dir, env=prefect_env(project_dir), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise DeployFailed(
            f"`prefect deploy --all` did not finish within {timeout_s:.0f} s",
            hint="check that the Prefect API (PREFECT_API_URL) answers: `prefect config view`",
        ) from None
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise DeployFailed(
            f"`prefect deploy --all` failed (exit {done.returncode}):\n{tail}",
            hint="fix prefect.yaml or the flow it names; `prefect deploy --all` in the project folder shows all",
        )
    return output


def register(app: typer.Typer) -> None:
    """Add blocks-register, offhost-block, deploy, up, down and chaos to the crypto-agent CLI."""

    @app.command("blocks-register")
    def blocks_register() -> None:
        """Register the Block types and create the default Block documents (escalation on the local receiver)."""
        from blocks.register import register_defaults

        done = register_defaults()
        print(f"block types: {', '.join(done.block_types)}")
        for name in done.documents:
            print(f"saved {name}")
        for name in done.skipped:
            print(f"skipped {name}")

    @app.command("offhost-block")
    def offhost_block(
        name: str = typer.Argument(..., help="The block's name; then set offhost_block (CRYPTO_AGENT_OFFHOST_BLOCK) "
                                   "to it."),
        bucket: str = typer.Option(..., "--bucket", help="The S3 bucket the daily backups are copied to."),
        endpoint: str = typer.Option("", "--endpoint", help="The endpoint of an S3-compatible store (MinIO, Ceph, "
                                     "...); empty: AWS itself."),
        region: str = typer.Option("us-east-1", "--region", help="The bucket's region."),
    ) -> None:
        """Save the prefect-aws S3Bucket block the daily verified backup is copied off the host to, and its
        AwsCredentials block (NAME-credentials, the secret in a Secret field), once the bucket answers to them.
        The keys come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, never the command line."""
        from flows.offhost import bucket_problem, save_offhost_block

        if not BLOCK_NAME_RE.fullmatch(name):
            raise InputError(f"block name {name!r} is not a Prefect block name",
                             hint="lower-case letters, digits and dashes, e.g. offhost-backups; nothing was saved")
        key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if not key_id or not secret:
            raise ConfigError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not both set in the environment",
                              hint="export both (read from the environment, the secret stays out of the shell's "
                              "history and the process list), then run this again; nothing was saved")
        problem = bucket_problem(bucket, endpoint or None, key_id, secret, region)
        if problem:
            raise ConfigError(f"bucket {bucket} at {endpoint or 'AWS'} cannot be used with these keys: {problem}",
                              hint="check --bucket, --endpoint, --region and the keys; nothing was saved")
        save_offhost_block(name, bucket, endpoint or None, key_id, secret, region)
        print(f"saved s3-bucket/{name} (bucket {bucket} at {endpoint or 'AWS'}) and aws-credentials/{name}-credentials")
        print(f"next: set offhost_block={name} (CRYPTO_AGENT_OFFHOST_BLOCK={name}); the daily backup copies to it")

    @app.command("deploy")
    def deploy(
        pool: str = typer.Option(WORK_POOL, "--pool", help="Process work pool; created when missing."),
        project_dir: Path = typer.Option(PROJECT_DIR, "--project-dir", help="Folder that holds prefect.yaml."),
    ) -> None:
        """Deploy every flow of prefect.yaml with its schedules and triggers, then the automations of
        deployments/automations.py (creates the process work pool if missing); rerunning updates, never duplicates."""
        from deployments.automations import apply_automations

        output = deploy_all(project_dir.resolve(), pool)
        deployed = [line for line in output.splitlines() if "Deployment '" in line]
        print("\n".join(deployed) if deployed else output)
        # After the deployments: the automations of deployments/automations.py refer to them by id.
        applied = apply_automations(project_dir=project_dir.resolve())
        for verb, names in (("created", applied.created), ("updated", applied.updated), ("deleted", applied.deleted)):
            for name in names:
                print(f"automation {name}: {verb}")
        for line in applied.skipped:
            print(f"warning: automation {line}", file=sys.stderr)
        print(f"start a worker: prefect worker start --pool {pool}")

    @app.command("up")
    def up(
        detach: bool = typer.Option(False, "--detach", help="Return once everything is up (stop with `down`)."),
        prefect_port: int | None = typer.Option(
            None, "--prefect-port", help="Port of the Prefect server and UI (default: prefect_port, 4200)."
        ),
        simulator_port: int | None = typer.Option(
            None, "--simulator-port", help="Port of the exchange simulator (default: the one of exchange_url, 8765)."
        ),
        receiver_port: int | None = typer.Option(
            None, "--receiver-port", help="Port of the notification receiver (default: the one of receiver_url, 8766)."
        ),
        ui: bool = typer.Option(True, "--ui/--no-ui", help="Serve the Prefect UI."),
        only: list[str] = typer.Option(
            [], "--only", metavar="FLOW/DEPLOYMENT",
            help="Serve only this deployment of prefect.yaml (repeatable; default: every one), e.g. no nightly job.",
        ),
    ) -> None:
        """The whole stack on 127.0.0.1: Prefect server, simulator, receiver, backfilled store, services, flows.

        A second `up` reuses what runs. In the foreground Ctrl-C (or SIGTERM) stops what it started.
        """
        from rich.console import Console

        from deployments.stack import plan_stack, run_up

        plan = plan_stack(prefect_port=prefect_port, simulator_port=simulator_port,
                          receiver_port=receiver_port, ui=ui, only=only)
        out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
        raise typer.Exit(run_up(plan, detach=detach, out=out, err=err))

    @app.command("down")
    def down() -> None:
        """Stop the stack `up` started (a foreground `up` too), in reverse order; our processes only."""
        from rich.console import Console

        from crypto_agent.settings import load_settings
        from deployments.stack import bring_down

        problems = bring_down(load_settings(), Console(soft_wrap=True))
        if problems:
            print(f"error: {len(problems)} part(s) not stopped: {'; '.join(problems)}", file=sys.stderr)
            raise typer.Exit(1)

    # issue 6, rehearsals: `crypto-agent chaos <scenario>` (the drills' table: crypto_agent/chaos.py; the runner,
    # deployments/chaos.py, imports prefect: loaded only when a drill runs)
    from crypto_agent.chaos import DRILLS, drill

    @app.command("chaos")
    def chaos_command(
        scenario: str = typer.Argument(..., help=f"One of: {', '.join(DRILLS)}; or all (every one, in that order); "
                                       "or list."),
        max_wait: float | None = typer.Option(None, "--max-wait", min=10,
                                              help="Cap, in seconds, on every wait (detection, recovery, verify)."),
    ) -> None:
        """Rehearse a runbook incident on the running stack: inject it, follow the recovery, print the timeline.

        Exit 1 when a drill is not detected, recovered and verified in time. `all` prints the MTTR table.
        """
        if scenario == "list":
            for d in DRILLS.values():
                print(d.line)
            return
        names = list(DRILLS) if scenario == "all" else [drill(scenario).name]
        from crypto_agent.settings import load_settings
        from deployments.chaos import run_drills

        results = run_drills(names, load_settings(), max_wait_s=max_wait, say=lambda line: print(line, flush=True))
        failed = [r for r in results if not r.ok]
        if failed:
            print(f"error: {len(failed)} of {len(results)} drill(s) did not recover: "
                  + "; ".join(r.error or r.drill.name for r in failed), file=sys.stderr)
            raise typer.Exit(1)
