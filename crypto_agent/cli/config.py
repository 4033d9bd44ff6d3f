"""Commands: config (the effective settings)."""

from __future__ import annotations

import json

import typer

from crypto_agent.cli.app import app
from crypto_agent.settings import config_file, load_settings


@app.command("config")
def show_config(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print the effective settings and the config file they came from; exit 2 if one is malformed."""
    settings = load_settings()
    values = json.loads(settings.model_dump_json())
    if as_json:
        print(json.dumps(values, indent=2))
        return
    src = config_file()
    print(f"# config file: {src if src else '(none; defaults and environment)'}")
    for key, value in values.items():
        print(f"{key} = {value if not isinstance(value, list) or len(value) < 8 else f'[{len(value)} items]'}")
