"""Commands: backup, backups, restore-test, compact, restore (a backup or the replica), sentiment-update."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer

from crypto_agent import backup as backups_mod
from crypto_agent import replica
from crypto_agent.cli.app import app
from crypto_agent.cli.data import check_store_sound
from crypto_agent.errors import InputError
from crypto_agent.settings import Settings, load_settings


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


def _rows(tables: dict[str, int]) -> str:
    return ", ".join(f"{t}={n}" for t, n in tables.items() if n) or "no rows"


@app.command("backup")
def backup_cmd(
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the new backup (sha256, header, size, "
                                "schema, counts) and mark it good/bad; the full check is the restore drill's."),
    prune: bool = typer.Option(False, "--prune", help="Then apply the retention policy (backup_keep_*)."),
) -> None:
    """Online backup of the store to backup_dir/db_backup_YYYYMMDD.db with a manifest; exit 1 if it is bad."""
    s = load_settings()
    try:
        info = backups_mod.create(s.db_path, s.backup_dir, verify=verify)
    except backups_mod.BackupError:
        check_store_sound(s)  # a damaged live store is said as such, with its recovery
        raise
    print(f"backup {info.path}: {info.status}, {_mb(info.size)}, {_rows(info.tables)}")
    if prune:
        removed = backups_mod.retention(s.backup_dir, backups_mod.RetentionPolicy.from_settings(s))
        names = (": " + ", ".join(p.name for p in removed)) if removed else ""
        print(f"retention removed {len(removed)} backup(s){names}")


@app.command("backups")
def list_backups_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the backups, newest first, with their status (good, bad, unverified)."""
    s = load_settings()
    found = backups_mod.list_backups(s.backup_dir)
    if as_json:
        print(json.dumps([b.to_dict() for b in found], indent=2))
        return
    if not found:
        print(f"no backups in {s.backup_dir}; take one with `crypto-agent backup`")
        return
    print(f"# {s.backup_dir}")
    for b in found:
        h4 = b.tables.get("ohlcv_h4")
        line = f"{b.name}  {b.status:<10}  {_mb(b.size):>10}  ohlcv_h4={h4 if h4 is not None else '?'}"
        if b.problems and b.status != backups_mod.GOOD:
            line += f"  ({'; '.join(b.problems[:2])})"
        print(line)


@app.command("restore-test")
def restore_test_cmd() -> None:
    """The runbook's backup_test.sh: yesterday's backup exists, is sound, has >= 1000 H4 rows; exit 0/1."""
    s = load_settings()
    ok, message = backups_mod.restore_test(s.backup_dir, min_rows=s.backup_test_min_rows)
    print(message)
    raise typer.Exit(0 if ok else 1)


@app.command("compact")
def compact_cmd() -> None:
    """VACUUM the store under the recovery lock, then check storage; exit 1 when over storage_max_gb."""
    s = load_settings()
    check_store_sound(s)  # VACUUM of a damaged store fails, or rewrites the damage into every page
    result = replica.compact_store(s, "crypto-agent compact (cli)")
    print(f"compacted {result.db_path}: {_mb(result.size_before)} -> {_mb(result.size_after)} "
          f"in {result.duration_s:.1f} s")
    print(result.storage.message)
    if result.over_limit:
        raise typer.Exit(1)


@app.command("restore")
def restore_cmd(
    backup_file: Path | None = typer.Option(None, "--backup", help="A backup file (path, or a name in backup_dir)."),
    latest_good: bool = typer.Option(False, "--latest-good", help="The newest good backup."),
    hours_ago: float | None = typer.Option(None, "--hours-ago", help="The good backup of that many hours ago (48)."),
    from_replica: bool = typer.Option(False, "--from-replica", help="The Litestream replica: its newest point, "
                                      "or the state at --at."),
    at: str | None = typer.Option(None, "--at", help="With --from-replica: the point in time (ISO 8601, UTC)."),
    force: bool = typer.Option(False, "--force", help="Restore even though processes still have the database open."),
    reason: str = typer.Option("manual restore", "--reason", help="Written in the quarantine note."),
) -> None:
    """Put a backup (or the replica) in place of the store; the current database goes to quarantine (never
    overwritten). Litestream is paused meanwhile and replicates the restored store after."""
    chosen = [backup_file is not None, latest_good, hours_ago is not None, from_replica]
    if sum(chosen) != 1:
        raise InputError("say which backup: exactly one of --backup FILE, --latest-good, --hours-ago N, "
                         "--from-replica", hint="see the backups with `crypto-agent backups`")
    point = _point_in_time(at) if at is not None else None
    if point is not None and not from_replica:
        raise InputError("--at goes with --from-replica", hint="a daily backup is chosen with --hours-ago N")
    s = load_settings()
    if from_replica:
        _restore_from_replica(s, point, force, reason)
        return
    if backup_file is not None:
        path = backup_file if backup_file.exists() else s.backup_dir / backup_file
        info = backups_mod.backup_info(path)
    elif hours_ago is not None:
        info = backups_mod.backup_for_hours_ago(s.backup_dir, hours_ago)
    else:  # --latest-good
        info = backups_mod.choose_backup(s.backup_dir)
    with replica.paused(s):
        result = backups_mod.restore(info.path, s.db_path, s.quarantine_dir, owner="crypto-agent restore (cli)",
                                     reason=reason, allow_open=force)
    print(f"restored {result.db_path} from {info.name} ({_rows(result.tables)}) in {result.duration_s:.1f} s")
    if result.quarantined:
        print(f"the previous database is in {result.quarantined}")
    print("next: resync the data newer than the backup, then check integrity and staleness")


def _point_in_time(text: str) -> datetime:
    """--at: an ISO 8601 instant (UTC when it names no zone); InputError otherwise, or when it is in the future."""
    try:
        point = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"--at {text!r} is not an ISO 8601 time", hint="e.g. --at 2026-12-01T12:00:00Z") from None
    point = point if point.tzinfo else point.replace(tzinfo=UTC)
    if point > datetime.now(UTC):
        raise InputError(f"--at {text} is in the future", hint="choose a past instant, or leave --at out")
    return point


def _restore_from_replica(s: Settings, point: datetime | None, force: bool, reason: str) -> None:
    """The replica (newest point or `point`) restored into scratch, checked, then put in place as a backup is."""
    scratch = s.quarantine_dir / ".replica-scratch"
    got = replica.restore(s, scratch, timestamp=point, check_copy=False)
    try:
        with replica.paused(s):
            result = backups_mod.restore(got.path, s.db_path, s.quarantine_dir, owner="crypto-agent restore (cli)",
                                         reason=reason, allow_open=force)
    finally:
        replica.discard(got.path)
    print(f"restored {result.db_path} from the Litestream replica (txid {got.txid or '?'}, point in time "
          f"{got.point_iso}; {_rows(result.tables)}) in {got.seconds + result.duration_s:.1f} s")
    if result.quarantined:
        print(f"the previous database is in {result.quarantined}")
    print("next: resync the data newer than that point, then check integrity and staleness")


@app.command("sentiment-update")
def sentiment_update_cmd(
    fred_key: str | None = typer.Option(
        None, "--fred-key", help="FRED API key (else CRYPTO_AGENT_FRED_API_KEY; without one FRED is skipped)."),
) -> None:
    """Fear & Greed index into sentimento_mercado and FRED series into macro_series; exit 1 if a part failed."""
    from crypto_agent.sentiment import update_sentiment_macro
    from crypto_agent.store import open_store

    s = load_settings()
    check_store_sound(s)
    with open_store(s) as store:
        summary = update_sentiment_macro(store, s, fred_api_key=fred_key)
    print(summary.message)
