"""The runbook's five incident scenarios as recovery flows, run by automations (or by hand).

One module per scenario, each reading like its runbook section: daemon_crash (1), stale_data (2),
db_corruption (3), process_hang (4) and rollback (5, persistent failures). Each runs in the
skeleton (skeleton.py: the store-lock check, the incident opened or joined, the concurrency guard,
the close with the post-incident report as the markdown artifact `incident-<id>`) and uses the
steps several share (steps.py: probe, stop, clean, start, confirm; restore, resync, salvage).

Every flow takes `service` (crypto_agent's service name; the store scenarios ignore it), `event`
(the triggering event as the automation passes it: id, event, occurred, resource, payload) and
`settings` (overrides); `handover` is internal: a recovery calling another as a subflow passes the
incident they share and the concurrency limits it already holds.
"""

from __future__ import annotations

from flows.recovery.daemon_crash import recover_daemon_crash
from flows.recovery.db_corruption import recover_db_corruption
from flows.recovery.process_hang import recover_process_hang
from flows.recovery.rollback import rollback_persistent_failures
from flows.recovery.skeleton import (
    RECOVERY_CRASH_HOOKS,
    RECOVERY_FAILURE_HOOKS,
    Recovery,
    close_incidents_of_run,
    recovery_incident,
    resource_of,
)
from flows.recovery.stale_data import recover_stale_data

__all__ = [
    "RECOVERY_CRASH_HOOKS", "RECOVERY_FAILURE_HOOKS", "Recovery", "close_incidents_of_run", "recover_daemon_crash",
    "recover_db_corruption", "recover_process_hang", "recover_stale_data", "recovery_incident", "resource_of",
    "rollback_persistent_failures",
]
