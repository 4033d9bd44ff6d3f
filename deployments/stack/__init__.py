"""The whole stack on this machine from one command: `crypto-agent up` brings it up, `crypto-agent down` stops it.

`up` starts, in order: a Prefect server on SQLite (PREFECT_HOME inside the project home), the exchange
simulator and the local notification receiver, backfills the store for the universe, starts the paper
trader and the backtest daemon, registers the Block types and default documents, starts the one
process that runs the flows (deployments/serve.py: it creates every deployment of prefect.yaml with
its schedules and triggers, or only those of `--only`), applies the automations of
deployments/automations.py and starts the heartbeat relay. Every child runs detached in its own session,
its PID and identity recorded under run/ (crypto_agent.process: never a signal to a PID that is not
the process we started). A second `up` reuses what runs and answers. In the foreground `up` waits for
Ctrl-C or SIGTERM and then stops what it started, in reverse order; `crypto-agent down` does the same
from another terminal. Prefect is imported inside the functions that talk to the API.

The modules, in the order a reader needs them:

- plan.py: the part names and start order, the plan (settings, ports, Prefect home, deployments served),
  the environment of every child, run/stack.json;
- parts.py: each part as a child process or service, ports, starting one (or reusing it), stopping one;
- up.py: `bring_up` (every step in order, stopping what it started on a failure or a signal), `bring_down`;
- run.py: `run_up`, what `crypto-agent up` prints and how it holds the foreground.
"""

from deployments.stack.parts import (
    Part,
    Stack,
    ensure_port_free,
    part_spec,
    port_free,
    receiver_child,
    serve_child,
    simulator_child,
    stop_part,
)
from deployments.stack.plan import (
    START_ORDER,
    PortTaken,
    StackConflict,
    StackInterrupted,
    StackPlan,
    child_env,
    deployment_names,
    plan_stack,
    read_record,
)
from deployments.stack.run import run_up
from deployments.stack.up import bring_down, bring_up

# What the CLI (deployments/cli.py), the drills and the tests import from deployments.stack; the rest is
# imported from its module (deployments.stack.plan, .parts, .up, .run).
__all__ = [
    "START_ORDER", "Part", "PortTaken", "Stack", "StackConflict", "StackInterrupted", "StackPlan", "bring_down",
    "bring_up", "child_env", "deployment_names", "ensure_port_free", "part_spec", "plan_stack", "port_free",
    "read_record", "receiver_child", "run_up", "serve_child", "simulator_child", "stop_part",
]
