"""Commands: replicate (Litestream beside the store, kept running, for systemd or a terminal)."""

from __future__ import annotations

import time

from crypto_agent import keeper, process, replica, storelock
from crypto_agent.cli.app import app
from crypto_agent.errors import ConfigError, CryptoAgentError
from crypto_agent.service import ServiceAlreadyRunning
from crypto_agent.settings import load_settings

POLL_S = 1.0


@app.command("replicate")
def replicate_cmd() -> None:
    """Replicate the store continuously with Litestream (run/litestream.yml from the settings) until SIGTERM.

    Production runs this as crypto-agent-litestream.service (the stack runs Litestream as its own part). It keeps
    Litestream running as a child with the stack's pidfile (run/litestream.pid), so a recovery that replaces the
    store's file pauses it as on the stack (crypto_agent.replica.paused); it waits while a recovery has it
    paused or holds the store's lock, and starts it again when it died or the recovery could not.
    """
    s = load_settings()
    if not s.replica_enabled:
        raise ConfigError("replication is off (replica_enabled=false)",
                          hint="set CRYPTO_AGENT_REPLICA_ENABLED=true to replicate the store")
    if not s.db_path.is_file():
        raise ConfigError(f"no store at {s.db_path} to replicate",
                          hint="create it first (`crypto-agent up`, or `crypto-agent collect`), then replicate")
    command = replica.replicate_command(s)
    spec = replica.replicator_spec(s, command)
    target = s.replica_url or str(s.replica_dir)
    print(f"replicating {s.db_path} to {target} every {s.replica_sync_interval_s:g} s ({command[-1]})", flush=True)
    stopping = process.stop_event_on_signals()
    history, said = keeper.PartHistory(replica.REPLICATOR), ""
    while not stopping.is_set():
        process.reap_children()  # a Litestream a recovery stopped was our child: no zombie left per pause
        running = process.inspect(spec).alive
        decision = replica.keep_decision(running, replica.paused_by(s), storelock.is_locked(s.db_path))
        if decision.why != said:
            print(decision.why, flush=True)
            said = decision.why
        if running:
            keeper.seen_alive(history, time.monotonic())
        if not decision.start:
            stopping.wait(POLL_S)
            continue
        # the stack keeper's backoff: at once on the first death of a streak, then doubling to a minute
        due = keeper.decide(history, time.monotonic())
        if not due.restart:
            stopping.wait(min(due.wait_s, POLL_S))
            continue
        keeper.restarted(history, time.monotonic(), told=False)
        try:
            started = process.start_child(spec, env=replica.litestream_env(s), ready=lambda: True, timeout_s=30.0)
        except ServiceAlreadyRunning:
            continue
        except CryptoAgentError as exc:
            print(f"Litestream did not start ({due.reason}): {exc.message}", flush=True)
            continue
        print(f"Litestream started (PID {started.pid}; {due.reason})", flush=True)
        said = "Litestream runs"
        stopping.wait(POLL_S)
    stopped = process.stop(spec)
    print("replication stopped" + (f" (Litestream PID {stopped.pid})" if stopped.was_running else ""), flush=True)
