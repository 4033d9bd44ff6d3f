"""CLI plugins: commands that live outside crypto_agent (the Prefect side) join `crypto-agent`
through the entry point group "crypto_agent.cli", found by importlib.metadata in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = textwrap.dedent(
    '''
    import typer

    def register(app: typer.Typer) -> None:
        @app.command("hello-plugin")
        def hello() -> None:
            """Say hello from a plugin."""
            print("hello from the plugin")

    def broken(app: typer.Typer) -> None:
        raise RuntimeError("this plugin is broken")
    '''
)


def install_plugin(root: Path, entry_points: str) -> None:
    """A real distribution on sys.path: a module and a dist-info with entry points."""
    (root / "demo_plugin.py").write_text(PLUGIN)
    dist = root / "demo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)


def crypto_agent(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("CRYPTO_AGENT_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-c", "from crypto_agent.cli import main; main()", *args],
        env=env, cwd=root, capture_output=True, text=True, timeout=120,
    )


def test_a_plugin_command_joins_the_cli(tmp_path: Path) -> None:
    install_plugin(tmp_path, "[crypto_agent.cli]\ndemo = demo_plugin:register\n")
    done = crypto_agent(tmp_path, "hello-plugin")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello from the plugin"


def test_a_broken_plugin_is_reported_and_the_rest_of_the_cli_works(tmp_path: Path) -> None:
    install_plugin(tmp_path, "[crypto_agent.cli]\nbad = demo_plugin:broken\ndemo = demo_plugin:register\n")
    done = crypto_agent(tmp_path, "hello-plugin")
    assert done.returncode == 0, done.stderr
    assert "warning: CLI plugin bad (demo_plugin:broken) did not load: this plugin is broken" in done.stderr
    assert "hello from the plugin" in done.stdout


def test_the_cli_never_imports_prefect_by_itself(tmp_path: Path) -> None:
    code = "import sys; import crypto_agent.cli, crypto_agent.receiver; print('prefect' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
