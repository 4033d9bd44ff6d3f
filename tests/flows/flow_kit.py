"""Helpers of the flow tests: read back what a flow run emitted and what the receiver got."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import TaskRun
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventRelatedFilter
from prefect.events.schemas.events import ReceivedEvent

from crypto_agent.receiver import Receiver

TEST_SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
# 60 days of 3 symbols: 1,080 H4 rows, over the restore test's 1,000.
TEST_HISTORY_DAYS = 60


def flow_run_events(flow_run_id: Any, name: str, timeout_s: float = 30.0) -> list[ReceivedEvent]:
    """Events called `name` that a flow run emitted, read back from the Prefect API (waits for delivery)."""
    wanted = EventFilter(
        occurred=EventOccurredFilter(
            since=datetime.now(UTC) - timedelta(hours=1), until=datetime.now(UTC) + timedelta(hours=1)
        ),
        event=EventNameFilter(name=[name]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            # the server takes at most 50 per page (the client's default of 100 is refused)
            events = client.read_events(filter=wanted, limit=50).events
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.25)


def task_runs_of(flow_run_id: Any) -> dict[str, TaskRun]:
    """The task runs of a flow run by task name (the last one of each name)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in sorted(runs, key=lambda r: r.expected_start_time or 0)}


def wait_for_messages(receiver: Receiver, path: str, count: int = 1, timeout_s: float = 30.0) -> list[dict]:
    """The receiver's messages on `path` once there are `count` of them (or what arrived by the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = receiver.messages(path)
        if len(got) >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def artifacts_of(flow_run_id: Any, key: str) -> list[Any]:
    """The artifacts a flow run (or its task runs) published under `key`, their data decoded; newest last."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    out = []
    for artifact in sorted(found, key=lambda a: a.created or 0):
        data = artifact.data
        if isinstance(data, str) and data[:1] in "[{":
            data = json.loads(data)
        out.append(data)
    return out
