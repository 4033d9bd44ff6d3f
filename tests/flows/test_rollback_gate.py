"""rollback-persistent-failures asks a person before the last resort: the run pauses for a RollbackApproval in the
Prefect UI, driven here for real (the flow in a thread, resumed through the API with the form's input):
approved, rejected, no decision with rollback_on_timeout proceed and wait."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from flow_kit import wait_for_messages
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.flow_runs import resume_flow_run
from recovery_kit import (
    Keeper,
    action,
    add_result,
    all_incidents,
    checkpoint,
    filled_env,  # noqa: F401 (the `env` fixture: a store of 60 days of candles)
    incident_of,
    rows,
    running_pid,
    settings_of,
    steps,
)
from service_kit import keeper  # noqa: F401 (the fixture, one for every test module)

from crypto_agent import backup, holds, process
from crypto_agent.incidents import ESCALATED
from crypto_agent.receiver import Receiver
from crypto_agent.settings import Settings
from flows.recovery import rollback_persistent_failures

HOUR_MS = 3_600_000
GATE_S = 120.0  # long enough for a test to answer; an answer lost would show as a proceed after it


class Gated:
    """A rollback run started as a deployment's run would be (here in a thread), for the test to answer its gate
    through the Prefect API as a person answers the form in the UI."""

    def __init__(self, **kwargs: Any) -> None:
        self.cfg = settings_of(kwargs["settings"])
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, kwargs=kwargs, daemon=True, name="gated-rollback")
        self.thread.start()

    def _run(self, **kwargs: Any) -> None:
        try:
            self.outcome["result"] = rollback_persistent_failures(**kwargs)
        except BaseException as exc:  # noqa: BLE001 (handed to the test's thread by result())
            self.outcome["error"] = exc

    @property
    def flow_run_id(self) -> UUID:
        """The run's id, from its incident (recorded when the incident opens, before the gate)."""
        deadline = time.monotonic() + 90
        while True:
            found = [i for i in all_incidents(self.cfg) if i.scenario == "persistent-failures" and i.flow_run_id]
            if found:
                return UUID(found[0].flow_run_id)
            if time.monotonic() > deadline or not self.thread.is_alive():
                pytest.fail(f"the rollback opened no incident: {self.outcome}")
            time.sleep(0.2)

    def paused(self, key: str = "rollback-approval-1", timeout_s: float = 90) -> FlowRun:
        """The flow run once it is Paused at the gate's `key`-th ask, waiting for the form."""
        run_id = self.flow_run_id
        deadline = time.monotonic() + timeout_s
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_paused() and run.state.state_details.pause_key == key:
                    return run
                if time.monotonic() > deadline or not self.thread.is_alive():
                    pytest.fail(f"flow run {run_id} not paused at {key} (state {run.state}): {self.outcome}")
                time.sleep(0.2)

    def answer(self, approve: bool, by: str, note: str = "", key: str = "rollback-approval-1") -> None:
        """Resume the paused run with the form's input, as the UI's Resume button does."""
        run = self.paused(key)
        resume_flow_run(run.id, run_input={"approve": approve, "by": by, "note": note})

    def result(self, timeout_s: float = 180) -> dict[str, Any]:
        """The flow's summary once it returns (its error raised here)."""
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the rollback still runs after {timeout_s:g} s"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["result"]

    def state(self) -> str:
        """The flow run's state now."""
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(self.flow_run_id).state
        return state.name if state is not None else "none"


def now_ms() -> int:
    return int(time.time() * 1000)


def store_with_backups(cfg: Settings, keeper: Keeper) -> backup.BackupInfo:
    """Backups of 2 days and 1 day ago, rows of both times and of now in the store, both services running;
    the 2-day backup (the one the rollback restores)."""
    db = Path(cfg.db_path)
    now = datetime.now(UTC)
    add_result(db, "state-of-48h-ago", now_ms() - 49 * HOUR_MS)
    two_days = backup.create(db, cfg.backup_dir, now=now - timedelta(days=2))
    add_result(db, "state-of-24h-ago", now_ms() - 25 * HOUR_MS)
    backup.create(db, cfg.backup_dir, now=now - timedelta(days=1))
    add_result(db, "state-of-now", now_ms())
    checkpoint(db)
    for name in ("trader", "backtest"):
        keeper.start(process.service_spec(name, cfg), cfg)
    return two_days


def run_ids(cfg: Settings) -> set[str]:
    return {r[0] for r in rows(Path(cfg.db_path), "SELECT DISTINCT run_id FROM backtest_results")}


class TestApproved:
    def test_the_rollback_tells_l3_what_it_would_restore_waits_and_proceeds_once_approved(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        two_days = store_with_backups(cfg, keeper)
        trader = running_pid(cfg, "trader")
        gated = Gated(settings={**env, "rollback_approval_timeout_s": GATE_S})
        run = gated.paused()

        # paused before anything was stopped: L3 told which backup, when, what is lost, where to approve
        [ask] = wait_for_messages(inbox, "/l3", 1)
        assert "needs approval: rollback to " + two_days.name in ask["body"]["subject"]
        body = ask["body"]["body"]
        assert f"would restore {two_days.name} (taken " in body and "h of data newer than it are replaced" in body
        assert str(cfg.quarantine_dir) in body
        assert "Approve or reject it in the Prefect UI: http://127.0.0.1:" in body
        assert f"/runs/flow-run/{run.id}" in body
        assert running_pid(cfg, "trader") == trader and "state-of-now" in run_ids(cfg)
        assert running_pid(cfg, "backtest") is None  # the crash-looping backtest paused while a person decides
        [inc] = [i for i in all_incidents(cfg) if i.scenario == "persistent-failures"]
        requested = action(inc, "approval-requested")["detail"]
        assert f"would restore {two_days.name}" in requested and f"/runs/flow-run/{run.id}" in requested

        gated.answer(True, "alice", "the crash logs point at yesterday's data")
        result = gated.result()

        assert result["outcome"] == "recovered", result
        assert result["backup"] == str(two_days.path)
        assert run_ids(cfg) == {"state-of-48h-ago"}
        inc = incident_of(cfg, result)
        assert action(inc, "approval")["detail"] == ("rollback approved by alice: the crash logs point at "
                                                     "yesterday's data")
        order = steps(inc)
        trader_stop = next(i for i, a in enumerate(inc.actions) if a["step"] == "stop" and "trader" in a["detail"])
        assert order.index("approval-requested") < order.index("approval") < trader_stop < order.index("restore")
        assert gated.state() == "Completed"
        assert running_pid(cfg, "trader") is not None and running_pid(cfg, "backtest") is None


class TestRejected:
    def test_a_rejection_restores_nothing_and_leaves_the_incident_to_a_person(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        store_with_backups(cfg, keeper)
        db = Path(cfg.db_path)
        trader = running_pid(cfg, "trader")
        gated = Gated(settings={**env, "rollback_approval_timeout_s": GATE_S})
        gated.paused()  # the backtest (which may have written a result since it started) is stopped by now
        before = (run_ids(cfg), db.stat().st_ino)
        assert {"state-of-48h-ago", "state-of-24h-ago", "state-of-now"} <= before[0]
        gated.answer(False, "bob", "it is a bug in the new strategy, not the data")
        result = gated.result()

        assert result["outcome"] == "escalated", result
        assert (run_ids(cfg), db.stat().st_ino) == before  # the same database file, its rows unchanged
        assert not Path(cfg.quarantine_dir).exists() or not any(Path(cfg.quarantine_dir).iterdir())
        inc = incident_of(cfg, result)
        assert inc.status == ESCALATED and inc.needs_person
        assert inc.summary.startswith("rollback rejected by bob: it is a bug in the new strategy, not the data; "
                                      "nothing restored")
        assert action(inc, "approval")["detail"] == ("rollback rejected by bob: it is a bug in the new strategy, "
                                                     "not the data")
        assert "restore" not in steps(inc) and "lock" not in steps(inc)
        assert [a["detail"] for a in inc.actions if a["step"] == "stop"] == [
            a["detail"] for a in inc.actions[:steps(inc).index("approval-requested")] if a["step"] == "stop"]
        assert running_pid(cfg, "trader") == trader  # live trading left as it was
        assert running_pid(cfg, "backtest") is None
        daemon = process.service_spec("backtest", cfg)
        hold = holds.read_hold(daemon)
        assert hold is not None and hold.by == f"rollback-persistent-failures #{inc.id}"  # still paused
        l3 = wait_for_messages(inbox, "/l3", 2)
        assert "needs approval" in l3[0]["body"]["subject"]
        assert "rollback rejected by bob" in l3[-1]["body"]["body"]
        assert "Why L3: the rollback was NOT done: rollback rejected by bob" in l3[-1]["body"]["body"]
        assert "l3" in inc.levels_told
        assert gated.state() == "Completed"


class TestNoDecision:
    def test_with_proceed_the_rollback_goes_on_after_the_timeout_as_the_automatic_last_resort(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        two_days = store_with_backups(cfg, keeper)
        gated = Gated(settings={**env, "rollback_approval_timeout_s": 2, "rollback_on_timeout": "proceed"})
        result = gated.result()

        assert result["outcome"] == "recovered", result
        assert result["backup"] == str(two_days.path) and run_ids(cfg) == {"state-of-48h-ago"}
        inc = incident_of(cfg, result)
        assert action(inc, "approval-timeout")["detail"] == ("no decision within 2 s: proceeding as the runbook's "
                                                             "automatic last resort")
        assert "approval" not in steps(inc)
        assert gated.state() == "Completed"  # taken back to Running after the pause's timeout, not Failed
        assert len(wait_for_messages(inbox, "/l3", 2)) == 2  # the ask, then the rollback done

    def test_with_wait_l3_is_paged_again_the_run_pauses_again_and_an_approval_then_restores(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        two_days = store_with_backups(cfg, keeper)
        gated = Gated(settings={**env, "rollback_approval_timeout_s": 6, "rollback_on_timeout": "wait"})
        gated.paused("rollback-approval-1")
        run = gated.paused("rollback-approval-2", timeout_s=60)  # the first ask timed out: asked again

        asks = wait_for_messages(inbox, "/l3", 2)
        assert "needs approval" in asks[0]["body"]["subject"]
        assert "still needs approval: rollback to " + two_days.name in asks[1]["body"]["subject"]
        assert "(ask 2 of 4)" in asks[1]["body"]["body"]
        assert run.state is not None and run.state.is_paused()
        assert "state-of-now" in run_ids(cfg)  # nothing restored while it waits
        [inc] = [i for i in all_incidents(cfg) if i.scenario == "persistent-failures"]
        assert "no decision within 6 s (ask 1 of 4): L3 paged again" in action(inc, "approval-timeout")["detail"]

        gated.answer(True, "carol", key="rollback-approval-2")
        result = gated.result()
        assert result["outcome"] == "recovered", result
        assert run_ids(cfg) == {"state-of-48h-ago"}
        assert action(incident_of(cfg, result), "approval")["detail"] == "rollback approved by carol"
        assert gated.state() == "Completed"

