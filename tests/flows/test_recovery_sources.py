"""Issue 12: where the corruption recovery restores from. The Litestream replica first (a real `litestream
replicate` beside the store, paused while the file is replaced and started again on the new one), then the daily
backups, then the off-host copies in an S3 bucket (moto's real server on 127.0.0.1), then the rebuild."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for s3_kit

from recovery_kit import (
    action,
    add_result,
    checkpoint,
    event,
    execute,
    filled_env,  # noqa: F401 (the `env` fixture: a store of 60 days of candles)
    incident_of,
    leaf_page,
    rows,
    settings_of,
    smash_page,
    steps,
    wait_until,
)
from s3_kit import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, moto_s3

from crypto_agent import backup, process, replica
from crypto_agent.receiver import Receiver
from crypto_agent.store import check_integrity
from flows.events import STORE_CORRUPT
from flows.offhost import save_offhost_block, upload_backup
from flows.recovery import recover_db_corruption

STORE = "crypto-agent.store.main"


def corrupt_event() -> dict[str, Any]:
    return event(STORE_CORRUPT, STORE, mode="quick_check", problems=["database disk image is malformed"])


def test_a_corrupt_store_is_restored_from_the_replica_with_the_rows_written_seconds_before(
    env: dict[str, Any], inbox: Receiver
) -> None:
    cfg = settings_of(env)
    db = Path(cfg.db_path)
    spec = replica.replicator_spec(cfg, replica.replicate_command(cfg))
    started = process.start_child(spec, env=replica.litestream_env(cfg), ready=lambda: True, timeout_s=30)
    try:
        wait_until(lambda: (cfg.replica_dir / "ltx").exists(), 30, "Litestream's first snapshot")
        add_result(db, "seconds-before-the-damage", int(time.time() * 1000))
        time.sleep(2.5)  # replicated (sync interval 1 s)
        checkpoint(db)
        smash_page(db, leaf_page(db, "ohlcv_h1"))
        assert not check_integrity(db, full=True).ok
        assert not list(cfg.backup_dir.glob("db_backup_*.db"))  # no daily backup at all: the replica is the source
        result = recover_db_corruption(settings=env, event=corrupt_event())
        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        order = steps(inc)
        assert order.index("pause-replication") < order.index("restore") < order.index("resume-replication")
        assert "litestream-replica-txid-" in action(inc, "restore")["detail"], action(inc, "restore")
        assert "backup-refused" not in order and "rebuild" not in order
        assert action(inc, "data-lost")["detail"].endswith("lost per table: nothing"), action(inc, "data-lost")
        assert check_integrity(db, full=True).ok
        assert rows(db, "SELECT run_id FROM backtest_results WHERE run_id = 'seconds-before-the-damage'")
        # the copy prepared while REINDEX was tried is the one put in place: nothing left in the scratch folder
        assert not list((db.parent / ".replica-restore").glob("replica-restore-*"))
        # Litestream replicates the new file: a new instance of ours, not the one stopped for the restore
        now = process.inspect(replica.replicator_spec(cfg))
        assert now.alive and now.pid != started.pid, action(inc, "resume-replication")
    finally:
        process.stop(replica.replicator_spec(cfg))


def test_a_damaged_index_repaired_by_reindex_throws_the_replica_copy_made_meanwhile_away(
    env: dict[str, Any], inbox: Receiver
) -> None:
    cfg = settings_of(env)
    db = Path(cfg.db_path)
    execute(db, "CREATE INDEX ix_ohlcv_h1_close ON ohlcv_h1 (close, symbol)")
    checkpoint(db)  # the index in the file before Litestream's read transaction holds checkpoints back
    spec = replica.replicator_spec(cfg, replica.replicate_command(cfg))
    process.start_child(spec, env=replica.litestream_env(cfg), ready=lambda: True, timeout_s=30)
    try:
        wait_until(lambda: (cfg.replica_dir / "ltx").exists(), 30, "Litestream's first snapshot")
        time.sleep(1.5)  # replicated: the replica's copy can be prepared
        smash_page(db, leaf_page(db, "ix_ohlcv_h1_close"))
        result = recover_db_corruption(settings=env, event=corrupt_event())
        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        assert action(inc, "reindex")["ok"] and "install-repaired" in steps(inc) and "restore" not in steps(inc)
        assert check_integrity(db, full=True).ok
        scratch = db.parent / ".replica-restore"
        assert scratch.is_dir()  # the replica's copy was made beside the store while REINDEX ran
        assert not list(scratch.glob("replica-restore-*"))  # and thrown away: REINDEX lost nothing
    finally:
        process.stop(replica.replicator_spec(cfg))


def test_with_no_replica_and_no_local_backup_the_off_host_copy_is_fetched_and_restored(
    env: dict[str, Any], inbox: Receiver
) -> None:
    with moto_s3() as s3:
        bucket = f"sources-{uuid.uuid4().hex[:8]}"
        s3.client.create_bucket(Bucket=bucket)
        block = f"sources-{uuid.uuid4().hex[:8]}"
        save_offhost_block(block, bucket, s3.url, ACCESS_KEY_ID, SECRET_ACCESS_KEY, REGION)
        env = {**env, "offhost_block": block, "replica_enabled": False}
        cfg = settings_of(env)
        db = Path(cfg.db_path)
        info = backup.create(db, cfg.backup_dir)
        assert upload_backup(cfg, info).ok
        info.path.unlink()
        info.manifest_path.unlink()  # the host's disk lost its backups: only the bucket holds one
        checkpoint(db)
        smash_page(db, leaf_page(db, "ohlcv_h1"))
        result = recover_db_corruption(settings=env, event=corrupt_event())
    assert result["outcome"] == "recovered", result
    inc = incident_of(cfg, result)
    assert info.name in action(inc, "restore")["detail"]
    assert (cfg.backup_dir / info.name).is_file()  # fetched, checked against its manifest, kept
    assert backup.backup_info(cfg.backup_dir / info.name).status == backup.GOOD
    assert "rebuild" not in steps(inc) and check_integrity(db, full=True).ok
