"""Every command that meets a corrupt or unreadable store says so, names the file and the next step,
exits non-zero, writes nothing and never shows a traceback (issue 10, "bad input")."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from crypto_agent import faults
from crypto_agent.cli.storeerrors import as_store_error, database_error
from crypto_agent.errors import StoreCorrupt, StoreError, StoreUnreadable
from crypto_agent.quality import check_data
from crypto_agent.settings import Settings
from crypto_agent.store import Store

CLI = [sys.executable, "-m", "crypto_agent.cli"]
SYMBOLS = ("BTCUSDT", "ETHUSDT")
NEXT_STEPS = ("crypto-agent check-integrity", "crypto-agent restore", "CRYPTO_AGENT_DB_PATH")
H = 3_600_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with a sound store: 2000 hourly and 4-hourly candles of two symbols, ending 3 days ago."""
    home = tmp_path_factory.mktemp("template")
    settings = Settings(home=home)
    end = int(time.time() * 1000) // (4 * H) * (4 * H) - 72 * H
    with Store(settings.database_url) as store:
        for symbol in SYMBOLS:
            for tf, step in (("1h", H), ("4h", 4 * H)):
                store.upsert_candles(symbol, tf, [
                    (end - i * step, 1.0, 2.0, 0.5, 1.5, 10.0, end - i * step + step - 1, 5.0, 3)
                    for i in range(2000, 0, -1)
                ])
    return home


def damage(home: Path, fault: str) -> Path:
    """Damage the store of `home` for real; its path."""
    settings = Settings(home=home)
    db = settings.db_path
    if fault == "corrupt":  # leaf pages overwritten, as the chaos drills do
        faults.corrupt_pages(settings, table="ohlcv_h1", pages=3)
        faults.corrupt_pages(settings, table="ohlcv_h4", pages=3)
    elif fault == "header":  # the first page's header overwritten: "file is not a database"
        with db.open("r+b") as f:
            f.write(b"\x00" * 100)
    elif fault == "truncated":  # a few bytes left
        db.write_bytes(db.read_bytes()[:10])
    elif fault == "folder":  # unreadable as a file, even for root
        db.unlink()
        db.mkdir()
    elif fault == "mode000":
        db.chmod(0)
    else:
        raise AssertionError(fault)
    return db


def fingerprint(db: Path) -> object:
    """The bytes of the store and its WAL (a folder in place of the file: the folder's entries)."""
    if db.is_dir():
        return sorted(os.listdir(db))
    files = [db, db.with_name(db.name + "-wal")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.exists()}


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYPTO_AGENT_")}
    env.update(CRYPTO_AGENT_HOME=str(home), CRYPTO_AGENT_EXCHANGE_URL=f"http://127.0.0.1:{free_port()}")
    return subprocess.run([*CLI, *args], env=env, cwd=home, capture_output=True, text=True, timeout=120)


COLLECT = ("collect", "--symbols", ",".join(SYMBOLS), "--timeframes", "1h,4h")
BACKTEST = ("backtest", "--symbol", "ETHUSDT", "--timeframe", "1h", "--strategy", "sma_cross")
CASES = [
    ("corrupt", COLLECT),  # it used to write into the damaged file, or print SQLAlchemy's traceback
    ("corrupt", ("run",)),
    ("corrupt", (*BACKTEST, "--save")),
    ("corrupt", ("backup",)),
    ("corrupt", ("compact",)),
    ("header", COLLECT),
    ("header", ("check-data",)),
    ("header", BACKTEST),
    ("truncated", ("check-data",)),
    ("truncated", ("sentiment-update",)),
    ("folder", COLLECT),
    ("folder", BACKTEST),
    ("folder", ("sentiment-update",)),
]


@pytest.mark.parametrize(("fault", "args"), CASES, ids=[f"{f}-{a[0]}{len(a)}" for f, a in CASES])
def test_a_command_on_a_bad_store_says_so_and_writes_nothing(
    template: Path, tmp_path: Path, fault: str, args: tuple[str, ...]
) -> None:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    db = damage(home, fault)
    before = fingerprint(db)
    r = run_cli(home, *args)
    output = r.stdout + r.stderr
    assert r.returncode != 0, output
    assert "Traceback" not in output
    assert f"error: the store {db} " in r.stderr, output
    assert any(step in r.stderr for step in NEXT_STEPS), output
    assert fingerprint(db) == before
    problem = ("is not a file", "cannot be opened") if fault == "folder" else ("is corrupt",)
    assert any(f"{db} {words}" in r.stderr for words in problem), output


@pytest.mark.parametrize("fault", ["corrupt", "header", "truncated"])
def test_check_integrity_reports_the_damage_as_its_result(template: Path, tmp_path: Path, fault: str) -> None:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    db = damage(home, fault)
    before = fingerprint(db)
    r = run_cli(home, "check-integrity")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith(f"CORRUPT (quick_check) {db}: ")
    assert "recover-db-corruption/auto" in r.stdout and "crypto-agent restore" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert fingerprint(db) == before


def test_check_integrity_on_a_folder_in_place_of_the_store_says_it_is_no_file(tmp_path: Path) -> None:
    db = Settings(home=tmp_path).db_path
    db.mkdir(parents=True)
    r = run_cli(tmp_path, "check-integrity")
    assert r.returncode == 2
    assert f"the store {db} is not a file" in r.stderr and "what to do:" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize(("fault", "service"), [("header", "trader"), ("truncated", "daemon")])
def test_a_service_on_a_bad_store_exits_crashed_and_its_log_says_why(
    template: Path, tmp_path: Path, fault: str, service: str
) -> None:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    db = damage(home, fault)
    before = fingerprint(db)
    r = run_cli(home, service)
    assert r.returncode == 70
    assert "Traceback" not in r.stdout + r.stderr
    # not on a terminal, a service writes its stderr into its log, where the recoveries read it
    log = Settings(home=home).logs_dir / ("trader.log" if service == "trader" else "backtest_24h7.log")
    assert f"service stopped (exit 70): the store {db} is corrupt" in log.read_text()
    assert fingerprint(db) == before


def test_status_on_a_bad_store_warns_and_still_probes(template: Path, tmp_path: Path) -> None:
    """status exits by the service's health (cron restarts on it); the store's damage is a warning.

    Its history record is best effort: on page-level damage SQLite may still write the probe sample
    into a sound page (as the running services do), so the bytes are checked for the header fault only.
    """
    home = tmp_path / "home"
    shutil.copytree(template, home)
    db = damage(home, "header")
    before = fingerprint(db)
    r = run_cli(home, "status", "--service", "trader")
    assert r.returncode == 1 and r.stdout.startswith("DEAD")
    assert f"warning: history not recorded: the store {db} is corrupt" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert fingerprint(db) == before


def test_a_corrupt_incident_log_is_named_as_such(template: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    log = Settings(home=home).incidents_db_path
    log.write_bytes(b"not sqlite at all; " * 10)
    r = run_cli(home, "incidents")
    assert r.returncode == 1
    assert f"error: the incident log {log} is corrupt (file is not a database)" in r.stderr
    assert "move it aside" in r.stderr and "Traceback" not in r.stdout + r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode (the folder case covers it)")
def test_a_store_without_read_permission_is_named_unreadable(template: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    db = damage(home, "mode000")
    try:
        for args in (COLLECT, ("check-data",)):
            r = run_cli(home, *args)
            assert r.returncode != 0 and "Traceback" not in r.stdout + r.stderr
            assert f"the store {db} " in r.stderr and any(step in r.stderr for step in NEXT_STEPS)
    finally:
        db.chmod(0o644)


class TestTheMapping:
    """In process: the errors the CLI's last-resort handler turns into the one message."""

    def test_an_engine_error_carries_the_file_and_maps_to_store_corrupt(self, template: Path, tmp_path: Path) -> None:
        home = tmp_path / "home"
        shutil.copytree(template, home)
        db = damage(home, "corrupt")
        store = Store(Settings(home=home).database_url, create=False)
        try:
            with pytest.raises(DBAPIError) as raised:
                store.open_times_all("1h")
        finally:
            store.close()
        assert raised.value.db_path == db  # type: ignore[attr-defined]
        err = database_error(raised.value)
        assert isinstance(err, StoreCorrupt) and err.exit_code == 1
        assert str(db) in err.message and "malformed" in err.message
        assert err.hint is not None and "check-integrity --full" in err.hint

    def test_a_wrapped_store_error_is_reworded_and_a_folder_is_unreadable(self, tmp_path: Path) -> None:
        db = Settings(home=tmp_path).db_path
        db.mkdir(parents=True)
        with pytest.raises(StoreUnreadable, match="cannot be opened"):
            Store(Settings(home=tmp_path).database_url)
        db.rmdir()
        db.write_bytes(b"\x01" * 200)
        store = Store(Settings(home=tmp_path).database_url, create=False)
        try:
            with pytest.raises(StoreError) as raised:
                check_data(store, Settings(home=tmp_path))
        finally:
            store.close()
        assert not isinstance(raised.value, StoreCorrupt)  # quality's own wording ...
        err = as_store_error(raised.value)
        assert isinstance(err, StoreCorrupt) and str(db) in err.message  # ... becomes the one message
