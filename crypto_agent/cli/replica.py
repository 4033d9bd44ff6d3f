"""Commands: replicate (Litestream beside the store, for systemd or a terminal)."""

from __future__ import annotations

import os

from crypto_agent import replica
from crypto_agent.cli.app import app
from crypto_agent.errors import ConfigError
from crypto_agent.settings import load_settings


@app.command("replicate")
def replicate_cmd() -> None:
    """Replicate the store continuously with Litestream (run/litestream.yml from the settings); runs until SIGTERM.

    The stack runs this as its `litestream` part; production runs it as crypto-agent-litestream.service.
    """
    s = load_settings()
    if not s.replica_enabled:
        raise ConfigError("replication is off (replica_enabled=false)",
                          hint="set CRYPTO_AGENT_REPLICA_ENABLED=true to replicate the store")
    if not s.db_path.is_file():
        raise ConfigError(f"no store at {s.db_path} to replicate",
                          hint="create it first (`crypto-agent up`, or `crypto-agent collect`), then replicate")
    command = replica.replicate_command(s)
    target = s.replica_url or str(s.replica_dir)
    print(f"replicating {s.db_path} to {target} every {s.replica_sync_interval_s:g} s ({command[-1]})", flush=True)
    os.execve(command[0], list(command), replica.litestream_env(s))  # Litestream itself, under this PID
