"""The restore drill on real backups: a real store backed up, restored into staging, real services run on it."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from crypto_agent import backup, drill, process
from crypto_agent.settings import Settings

try:
    from service_kit import make_settings, seed_store
except ImportError:  # tests/ became a package
    from tests.service_kit import make_settings, seed_store

# Only H1 candles in this store, so the runbook's ohlcv_h4 floor is off; the services cycle fast.
DRILL = {"backup_test_min_rows": 0}


def corrupt_a_page(path: Path, length: int = 4096) -> None:
    """Write bytes over a page in the middle of a file, after it was made (a bad sector, a bad copy)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(b"\xa5" * length)


def snapshot(*folders: Path) -> dict[str, tuple[int, str]]:
    """Every file under the folders: its mtime (ns) and sha256."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def live(tmp_path: Path) -> tuple[Settings, backup.BackupInfo, datetime]:
    """A live home with a small fresh store, yesterday's good backup of it, sentinel files in run/ and logs/."""
    settings = make_settings(tmp_path / "home", **DRILL)
    seed_store(settings)
    now = datetime.now(UTC)
    info = backup.create(settings.db_path, settings.backup_dir, now=now - timedelta(days=1))
    for folder in (settings.run_dir, settings.logs_dir):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sentinel").write_text("live\n")
    return settings, info, now


def live_files(settings: Settings) -> dict[str, tuple[int, str]]:
    return snapshot(settings.db_path.parent, settings.run_dir, settings.logs_dir)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class TestDrillOfAGoodBackup:
    def test_passes_with_its_figures_runs_both_services_and_leaves_the_live_home_alone(self, live) -> None:
        settings, info, now = live
        before = live_files(settings)

        result = drill.run_drill(settings, now=now)

        assert result.ok, result.problems
        assert result.backup == info.name
        assert result.problems == []
        assert set(result.healthy_s) == {"backtest", "trader"}
        assert all(s > 0 for s in result.healthy_s.values())
        assert result.restore_s is not None and result.restore_s > 0
        assert result.tables["ohlcv_h1"] == 300
        assert result.data_checks["ok"] and result.data_checks["checks"] == {
            "staleness": True, "coverage": True, "continuity": True}
        assert result.backtest["symbol"] == "BTCUSDT" and result.backtest["candles"] > 0
        # both services were started on staging and stopped cleanly: no process left
        for name in ("backtest", "trader"):
            svc = result.services[name]
            assert svc["stop_signal"] == "SIGTERM"
            assert gone(svc["pid"])
            assert not process.inspect(process.service_spec(name, drill.staging_settings(settings))).alive
        # staging is its own home, the live one is untouched
        staging = Path(result.staging)
        assert staging == settings.drill_dir.resolve()
        assert (staging / "db" / "crypto_agent.db").is_file()
        assert (staging / "logs").is_dir() and any((staging / "logs").iterdir())
        assert live_files(settings) == before
        # recorded
        record = drill.drill_record_path(settings)
        assert record == settings.home.resolve() / "drills.jsonl"
        [line] = record.read_text().splitlines()
        assert json.loads(line)["ok"] is True
        assert drill.last_drill(settings)["backup"] == info.name  # type: ignore[index]

    def test_a_second_drill_wipes_the_first_ones_staging(self, live) -> None:
        settings, _info, now = live
        first = drill.run_drill(settings, now=now)
        stale = Path(first.staging) / "logs" / "left-over.log"
        stale.write_text("from the first drill\n")

        second = drill.run_drill(settings, now=now)

        assert second.ok, second.problems
        assert not stale.exists()
        assert [json.loads(ln)["ok"] for ln in drill.drill_record_path(settings).read_text().splitlines()] == [
            True, True]

    def test_without_yesterdays_backup_the_newest_good_one_is_drilled_and_noted(self, live) -> None:
        settings, info, now = live
        result = drill.run_drill(settings, now=now + timedelta(days=3), record=False)
        assert result.ok, result.problems
        assert result.backup == info.name
        assert "was not found" in result.notes[0]


class TestDrillOfACorruptBackup:
    def test_fails_pages_material_and_starts_no_service(self, live) -> None:
        settings, info, now = live
        corrupt_a_page(info.path)
        before = live_files(settings)

        result = drill.run_drill(settings, now=now)

        assert not result.ok
        [problem] = result.problems
        assert problem.startswith("Backup corrupted or unusable:")
        assert "sha256 differs from the manifest" in problem
        assert result.services == {} and result.healthy_s == {}
        staging = drill.staging_settings(settings)
        assert not any(staging.run_dir.glob("*.pid"))
        assert not staging.db_path.exists()  # the restore never put a checked-bad copy in place
        assert backup.backup_info(info.path).status == backup.BAD  # never chosen by a restore again
        assert live_files(settings) == before
        assert drill.last_drill(settings)["ok"] is False  # type: ignore[index]
        subject, body = drill.page_message(result)
        assert subject == f"[crypto-agent] restore drill failed: {info.name}"
        assert "sha256 differs" in body and "to do:" in body

    def test_no_backup_at_all_fails_with_backup_not_found(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path / "home", **DRILL)
        result = drill.run_drill(settings)
        assert not result.ok and result.backup is None
        assert result.problems[0].startswith("Backup not found:")
        assert result.services == {}


class TestRefusals:
    def test_drill_dir_at_the_live_home_is_refused_and_nothing_is_touched(self, live) -> None:
        settings, _info, now = live
        at_home = settings.model_copy(update={"drill_dir": settings.home})
        before = snapshot(settings.home)
        with pytest.raises(drill.DrillRefused, match="is inside it"):
            drill.run_drill(at_home, now=now)
        assert snapshot(settings.home) == before
        assert not drill.drill_record_path(at_home).exists()

    def test_drill_dir_holding_the_live_db_is_refused(self, live) -> None:
        settings, _info, now = live
        with pytest.raises(drill.DrillRefused, match="live db_path"):
            drill.run_drill(settings.model_copy(update={"drill_dir": settings.db_path.parent}), now=now)

    def test_a_folder_that_is_not_a_staging_home_is_never_wiped(self, live, tmp_path: Path) -> None:
        settings, _info, now = live
        other = tmp_path / "someone-elses"
        other.mkdir()
        (other / "keep.txt").write_text("mine\n")
        with pytest.raises(drill.DrillRefused, match="not a staging home"):
            drill.run_drill(settings.model_copy(update={"drill_dir": other}), now=now)
        assert (other / "keep.txt").read_text() == "mine\n"


class TestStagingSettings:
    def test_every_path_is_inside_the_staging_home_and_the_rest_is_the_parents(self, tmp_path: Path,
                                                                                monkeypatch) -> None:
        live_db = tmp_path / "home" / "db" / "crypto_agent.db"
        monkeypatch.setenv("CRYPTO_AGENT_RUN_DIR", str(tmp_path / "home" / "run"))  # must not leak into staging
        settings = make_settings(tmp_path / "home", create_store=False, exchange_url="http://127.0.0.1:9999")
        staging = drill.staging_settings(settings)
        home = settings.drill_dir.resolve()
        assert staging.home == home
        for name in ("db_path", "run_dir", "logs_dir", "backup_dir", "quarantine_dir", "incidents_db_path",
                     "receiver_log", "replica_dir", "prefect_home"):
            assert home in Path(getattr(staging, name)).parents, name
        assert staging.database_url == f"sqlite:///{home / 'db' / 'crypto_agent.db'}" != f"sqlite:///{live_db}"
        assert staging.exchange_url == "http://127.0.0.1:9999"
        assert staging.symbols == settings.symbols and staging.heartbeat_interval_s == settings.heartbeat_interval_s


class TestFlowPagesL2:
    """backup-restore-test's own logic, the Prefect parts faked (no server): a failed drill pages L2 and fails."""

    @pytest.fixture
    def flow_parts(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
        import logging

        maintenance = pytest.importorskip("flows.maintenance")
        seen: dict[str, list] = {"pages": [], "artifacts": []}
        monkeypatch.setattr(maintenance, "get_run_logger", lambda: logging.getLogger("test-drill"))
        monkeypatch.setattr(maintenance, "restore_test", maintenance.restore_test.fn)  # the task's body, run here
        monkeypatch.setattr(maintenance, "create_markdown_artifact", lambda **kw: seen["artifacts"].append(kw))

        def page(cfg, key, active, level, subject="", body=""):
            seen["pages"].append({"key": key, "active": active, "level": level, "subject": subject, "body": body})
            return active

        monkeypatch.setattr(maintenance, "page_episode", page)
        seen["flow"] = [maintenance]
        return seen

    @staticmethod
    def overrides(settings: Settings) -> dict:
        return {"home": str(settings.home), "symbols": settings.symbols, "timeframes": settings.timeframes,
                **{k: getattr(settings, k) for k in ("heartbeat_interval_s", "heartbeat_max_age_s",
                                                     "daemon_cycle_pause_s", "trader_cycle_s", "probe_cpu_sample_s",
                                                     "backup_test_min_rows")}}

    def test_a_corrupt_backup_fails_the_run_and_pages_l2_with_the_problems(self, live, flow_parts) -> None:
        settings, info, now = live
        corrupt_a_page(info.path)
        maintenance = flow_parts["flow"][0]
        with pytest.raises(maintenance.BackupTestFailed, match="Backup corrupted"):
            maintenance.backup_restore_test.fn(settings=self.overrides(settings), now=now)
        [page] = flow_parts["pages"]
        assert page["active"] and page["level"] == "l2" and page["key"] == drill.ALERT_KEY
        assert "sha256 differs" in page["body"]
        [artifact] = flow_parts["artifacts"]
        assert artifact["key"] == "backup-restore-test" and "Restore drill FAILED" in artifact["markdown"]

    def test_a_good_drill_passes_and_ends_the_alert_episode(self, live, flow_parts) -> None:
        settings, info, now = live
        maintenance = flow_parts["flow"][0]
        message = maintenance.backup_restore_test.fn(settings=self.overrides(settings), now=now)
        assert message.startswith(f"✅ Backup test passed: {info.name} (rows=0)")
        [page] = flow_parts["pages"]
        assert page["active"] is False  # nobody is paged; a failing episode ends
