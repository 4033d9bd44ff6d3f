"""Rebuilding a store from a really corrupt SQLite file: untouched pages come back, the damage is reported."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import sys
from pathlib import Path

import pytest

from crypto_agent import faults, rebuild
from crypto_agent.rebuild import CLI_METHOD, WALK_METHOD, RebuildError
from crypto_agent.service import record_event
from crypto_agent.store import Store, check_integrity

try:
    from service_kit import make_settings
except ImportError:  # tests/ became a package
    from tests.service_kit import make_settings

HOUR_MS = 3_600_000
T0_MS = 1_780_000_000_000 // HOUR_MS * HOUR_MS
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def candle(i: int) -> tuple:
    """A plausible H1 candle, i hours after T0."""
    t = T0_MS + i * HOUR_MS
    return (t, 100.0 + i, 101.0 + i, 99.0 + i, 100.5 + i, 10.0 + i, t + HOUR_MS - 1, 1000.0 + i, 5 + i)


def fill(db: Path, candles: int = 400, results: int = 300) -> None:
    """A real store: candles of three symbols, backtest results, service events and a few probe samples."""
    with Store(f"sqlite:///{db}") as store:
        for s in SYMBOLS:
            store.upsert_candles(s, "1h", [candle(i) for i in range(candles)])
        store.upsert_candles("BTCUSDT", "4h", [candle(4 * i) for i in range(50)])
        for i in range(20):
            record_event(store, "trader", "started", pid=1000 + i, instance=f"{1000 + i}@1", source="test",
                         at=T0_MS / 1000 + i)
        with store.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO backtest_results (run_id, strategy, params, symbol, timeframe, period_start, period_end,"
                " candles, fee_bps, total_return, sharpe, max_drawdown, win_rate, trades, exposure, created_at)"
                " VALUES (?, 'sma_cross', ?, 'BTCUSDT', '1h', 0, 1, 100, 10, 0.1, 1.2, -0.1, 0.5, 3, 0.4, ?)",
                [(f"run-{i}", json.dumps({"fast": i, "slow": 50, "pad": "x" * 120}), T0_MS + i)
                 for i in range(results)])
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def leaves(db: Path, table: str) -> list[tuple[int, int]]:
    """(page number, cells) of the table's leaf pages, in page order."""
    conn = sqlite3.connect(db)
    try:
        return [(int(p), int(n)) for p, n in conn.execute(
            "SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno", (table,))]
    finally:
        conn.close()


def corrupt(db: Path, table: str) -> int:
    """Overwrite the b-tree header of a middle leaf of table, as faults.corrupt_pages does; that page's cells."""
    found = leaves(db, table)
    assert len(found) >= 3, f"{table} has too few pages to damage one in the middle"
    page, cells = found[len(found) // 2]
    conn = sqlite3.connect(db)
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.close()
    with db.open("r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(b"\x0d\x00\x00\x00\x10" + b"\xff" * 300)
    return cells


def rows(db: Path, sql: str) -> set[tuple]:
    """The rows a query returns, as a set."""
    conn = sqlite3.connect(db)
    try:
        return set(conn.execute(sql))
    finally:
        conn.close()


# What `sqlite3 DB .recover` and `sqlite3 DB < script.sql` do, closely enough to exercise the CLI path: a dump
# of every readable row (up to the damage) and a lost_and_found table, then the replay of the SQL read on stdin.
STANDIN_CLI = """#!{python}
import pathlib, sqlite3, sys
args = sys.argv[1:]
log = pathlib.Path(__file__).with_name("calls.log")
with log.open("a") as f:
    f.write(" ".join(args + ([] if args[-1] == ".recover" else ["stdin"])) + "\\n")
conn = sqlite3.connect(args[0])
if args[-1] == ".recover":
    out = ["BEGIN;"]
    lost = ["INSERT INTO lost_and_found VALUES (9, 9, 1, 1, 'x');"]
    check = sqlite3.connect(":memory:")  # a row its table would refuse goes to lost_and_found, as .recover does
    for name, sql in conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' "
                                  "AND name NOT LIKE 'sqlite_%'").fetchall():
        out.append(sql + ";")
        check.execute(sql)
        cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{{name}}")')]
        quoted = ", ".join(f'quote("{{c}}")' for c in cols)
        try:
            for row in conn.execute(f'SELECT {{quoted}} FROM "{{name}}"'):
                insert = f'INSERT INTO "{{name}}" VALUES ({{", ".join(row)}});'
                try:
                    check.execute(insert)
                    out.append(insert)
                except sqlite3.DatabaseError:
                    lost.append(f"INSERT INTO lost_and_found VALUES (9, 9, 1, {{len(lost) + 1}}, 'x');")
        except sqlite3.DatabaseError:
            pass
    out += ["CREATE TABLE lost_and_found (rootpgno, pgno, nfield, id, c0);", *lost, "COMMIT;"]
    print("\\n".join(out))
else:
    conn.executescript(sys.stdin.read())
conn.close()
"""


def sha256(path: Path) -> str:
    """The file's digest."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, dict[str, set[tuple]], dict[str, int]]:
    """A store with one damaged leaf in ohlcv_h1 and one in backtest_results; (its file, rows before, cells lost)."""
    db = tmp_path / "db" / "crypto_agent.db"
    fill(db)
    before = {"ohlcv_h1": rows(db, "SELECT * FROM ohlcv_h1"),
              "backtest_results": rows(db, "SELECT * FROM backtest_results"),
              "ohlcv_h4": rows(db, "SELECT * FROM ohlcv_h4"),
              "service_events": rows(db, "SELECT * FROM service_events")}
    lost = {"ohlcv_h1": corrupt(db, "ohlcv_h1"), "backtest_results": corrupt(db, "backtest_results")}
    assert not check_integrity(db).ok
    return db, before, lost


def assert_salvage(result: rebuild.RebuildResult, before: dict[str, set[tuple]], lost: dict[str, int]) -> None:
    """Every row of an untouched page is in the rebuilt store; at most the damaged page's rows are missing."""
    for table in ("ohlcv_h4", "service_events"):
        assert rows(result.target, f"SELECT * FROM {table}") == before[table]
        assert result.tables[table].recovered == len(before[table]) and result.tables[table].complete
    for table, cells in lost.items():
        got = rows(result.target, f"SELECT * FROM {table}")
        assert got <= before[table]
        missing = len(before[table]) - len(got)
        assert 0 < missing <= cells, (table, missing, cells)
        assert result.tables[table].recovered == len(got)
        # SQLite either refuses to read the damaged leaf (an unreadable range) or hands back its cells as
        # garbage that the fresh store's constraints refuse: either way the loss is reported
        damage = result.tables[table]
        assert damage.unreadable or damage.rejected == missing, (table, damage)
    assert not result.complete and result.damaged_tables == ["backtest_results", "ohlcv_h1"]


class TestWalk:
    def test_rows_of_untouched_pages_are_recovered_and_counted(self, damaged, tmp_path: Path) -> None:
        db, before, lost = damaged
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=None)
        assert result.method == WALK_METHOD and result.notes == []
        assert_salvage(result, before, lost)

    def test_the_missing_rows_are_exactly_the_reported_ranges(self, damaged, tmp_path: Path) -> None:
        db, before, _ = damaged
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=None)
        got = rows(result.target, "SELECT * FROM ohlcv_h1")
        missing = before["ohlcv_h1"] - got
        [where] = result.tables["ohlcv_h1"].unreadable
        symbol, _, span = where.partition(" timestamp in ")
        lo, hi = (int(x) for x in span.strip("[)").split(", "))
        assert all(r[0] == symbol and lo <= r[1] < hi for r in missing)
        results = result.tables["backtest_results"]
        assert all(r.startswith("rowid in [") for r in results.unreadable) and (results.unreadable or results.rejected)

    def test_the_corrupt_input_is_never_written(self, damaged, tmp_path: Path) -> None:
        db, _, _ = damaged
        digest, names = sha256(db), sorted(p.name for p in db.parent.iterdir())
        rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=None)
        assert sha256(db) == digest and sorted(p.name for p in db.parent.iterdir()) == names

    def test_rows_still_in_the_wal_are_recovered(self, damaged, tmp_path: Path) -> None:
        db, before, _ = damaged
        writer = sqlite3.connect(db, isolation_level=None)  # held open: its WAL is not folded in
        try:
            writer.execute("PRAGMA wal_autocheckpoint=0")
            writer.execute("INSERT INTO service_events (service, kind, at, pid, instance, source, detail) "
                           "VALUES ('trader', 'crashed', 1, 7, '7@1', 'test', 'in the WAL only')")
            assert Path(f"{db}-wal").stat().st_size > 0
            result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=None)
        finally:
            writer.close()
        assert result.tables["service_events"].recovered == len(before["service_events"]) + 1
        assert rows(result.target, "SELECT detail FROM service_events WHERE kind = 'crashed'") == {("in the WAL only",)}

    def test_the_rebuilt_store_is_sound_and_opens_as_a_store(self, damaged, tmp_path: Path) -> None:
        db, before, _ = damaged
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=None)
        with Store(f"sqlite:///{result.target}") as store:
            assert store.check_integrity(full=True).ok
            assert store.count("4h") == len(before["ohlcv_h4"])
        assert not list(tmp_path.glob(".rebuild-*")) and not list(tmp_path.glob(".*rebuilding*"))

    def test_the_summary_names_what_is_lost(self, damaged, tmp_path: Path) -> None:
        db, _, _ = damaged
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=None)
        assert result.summary.startswith(
            f"rebuilt rebuilt.db from crypto_agent.db by key walk: {result.recovered} rows; lost in backtest_results (")
        assert json.loads(json.dumps(result.to_dict()))["tables"]["ohlcv_h1"]["recovered"] == \
            result.tables["ohlcv_h1"].recovered

    def test_an_intact_store_comes_back_whole(self, tmp_path: Path) -> None:
        db = tmp_path / "db" / "ok.db"
        fill(db, candles=60, results=20)
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=None)
        assert result.complete and result.summary.endswith("nothing found unreadable")
        assert rows(result.target, "SELECT * FROM ohlcv_h1") == rows(db, "SELECT * FROM ohlcv_h1")

    def test_a_file_that_is_not_a_database_loses_every_table_but_yields_a_store(self, tmp_path: Path) -> None:
        junk = tmp_path / "junk.db"
        junk.write_bytes(b"not sqlite at all" * 500)
        result = rebuild.rebuild(junk, tmp_path / "rebuilt.db", cli=None)
        assert result.recovered == 0 and result.damaged_tables == sorted(result.tables)
        assert "does not open as SQLite" in result.tables["ohlcv_h1"].unreadable[0]
        with Store(f"sqlite:///{result.target}") as store:
            assert store.count("1h") == 0

    def test_the_candle_walk_finds_symbols_outside_the_universe(self, tmp_path: Path) -> None:
        db = tmp_path / "db" / "x.db"
        with Store(f"sqlite:///{db}") as store:
            store.upsert_candles("ZZZUSDT", "1h", [candle(i) for i in range(10)])
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=None, symbols=())
        assert result.tables["ohlcv_h1"].recovered == 10


class TestCli:
    def test_a_failing_cli_falls_back_to_the_walk(self, damaged, tmp_path: Path) -> None:
        db, before, lost = damaged
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli="false")
        assert result.method == WALK_METHOD
        [note] = result.notes
        assert re.fullmatch(r"/\S*/false \.recover failed \(exit 1\): : walked the keys instead", note), note
        assert_salvage(result, before, lost)

    def test_a_missing_cli_is_named_with_its_package(self, damaged, tmp_path: Path) -> None:
        db, _, _ = damaged
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli="no-such-sqlite3-cli")
        assert result.method == WALK_METHOD
        assert result.notes == [("the no-such-sqlite3-cli CLI is not installed (Debian: apt-get install sqlite3): "
                                 "walked the keys")]

    @pytest.mark.skipif(not rebuild.cli_recover_works(), reason="this sqlite3 CLI cannot .recover (Debian 12's "
                        "3.40 lacks sqlite_dbpage); the walk is tested above")
    def test_the_cli_recover_salvages_the_untouched_pages(self, damaged, tmp_path: Path) -> None:
        db, before, lost = damaged
        digest = sha256(db)
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db")
        assert result.method == CLI_METHOD and sha256(db) == digest
        for table in ("ohlcv_h4", "service_events"):
            assert rows(result.target, f"SELECT * FROM {table}") == before[table]
        for table, cells in lost.items():
            got = rows(result.target, f"SELECT * FROM {table}")
            assert len(before[table]) - cells <= len(got & before[table])
            assert result.tables[table].unreadable


    def test_the_cli_path_runs_recover_on_a_copy_and_replays_it_through_stdin(self, damaged, tmp_path: Path) -> None:
        """A stand-in CLI (this machine's sqlite3 cannot .recover): argument lists in, SQL through stdin."""
        db, before, lost = damaged
        cli = tmp_path / "bin" / "sqlite3-standin"
        cli.parent.mkdir()
        cli.write_text(STANDIN_CLI.format(python=sys.executable))
        cli.chmod(0o755)
        digest = sha256(db)
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=str(cli))
        assert result.method == CLI_METHOD and result.notes == [] and sha256(db) == digest
        assert result.orphans >= 1  # the fixed one, and the damaged cells a table would refuse, if SQLite read any
        for table in ("ohlcv_h4", "service_events"):
            assert rows(result.target, f"SELECT * FROM {table}") == before[table]
            assert result.tables[table].complete
        for table in lost:
            assert rows(result.target, f"SELECT * FROM {table}") <= before[table]
            damage = result.tables[table]
            # its damaged leaf: an unreadable range, or cells .recover could read but not place (lost_and_found)
            assert not damage.complete or result.orphans > 1, table
            assert all(why.startswith("damaged pages (DatabaseError: database disk image is malformed)")
                       for why in damage.unreadable)
        log = (tmp_path / "bin" / "calls.log").read_text().splitlines()
        assert [line.split()[-1] for line in log] == [".recover", "stdin"]
        assert "corrupt-copy.db" in log[0] and str(db) not in log[0]

    def test_a_recover_result_is_copied_into_the_project_schema(self, tmp_path: Path) -> None:
        recovered = tmp_path / "recovered.db"
        fill(recovered, candles=30, results=10)
        conn = sqlite3.connect(recovered)
        conn.execute("CREATE TABLE lost_and_found (rootpgno, pgno, nfield, id, c0, c1)")
        conn.execute("INSERT INTO lost_and_found VALUES (1, 2, 2, 3, 'a', 'b')")
        conn.execute("DROP TABLE probe_samples")
        conn.commit()
        conn.close()
        fresh_path = tmp_path / "fresh.db"
        tables = rebuild._fresh_store(fresh_path)
        fresh = sqlite3.connect(fresh_path, isolation_level=None)
        try:
            salvaged, orphans = rebuild._from_recovered(recovered, recovered, fresh, tables)
        finally:
            fresh.close()
        assert orphans == 1
        assert salvaged["ohlcv_h1"].recovered == 90 and salvaged["ohlcv_h1"].complete
        assert salvaged["backtest_results"].recovered == 10
        assert salvaged["probe_samples"].unreadable == ["table not found by .recover: every row lost"]


class TestRefusals:
    def test_an_existing_target_is_never_overwritten(self, damaged, tmp_path: Path) -> None:
        db, _, _ = damaged
        target = tmp_path / "rebuilt.db"
        target.write_bytes(b"precious")
        with pytest.raises(RebuildError, match="already exists: a rebuild never overwrites a database"):
            rebuild.rebuild(db, target, cli=None)
        assert target.read_bytes() == b"precious"
        with pytest.raises(RebuildError):
            rebuild.rebuild(db, db, cli=None)

    def test_a_missing_input_says_where_to_look(self, tmp_path: Path) -> None:
        with pytest.raises(RebuildError, match="does not exist") as err:
            rebuild.rebuild(tmp_path / "none.db", tmp_path / "rebuilt.db", cli=None)
        assert "quarantine" in str(err.value)
        assert not (tmp_path / "rebuilt.db").exists()


class TestRefetch:
    def test_the_windows_are_the_initial_history_minus_what_was_salvaged(self, tmp_path: Path) -> None:
        now_ms = T0_MS + 48 * HOUR_MS + 5
        with Store(f"sqlite:///{tmp_path / 'r.db'}") as store:
            store.upsert_candles("BTCUSDT", "1h", [candle(i) for i in range(48) if not 10 <= i < 14])
            windows = rebuild.refetch_windows(store, ["BTCUSDT", "ETHUSDT"], ["1h"], initial_history_days=2,
                                              now_ms=now_ms)
        assert windows == [("BTCUSDT", "1h", T0_MS + 10 * HOUR_MS, T0_MS + 14 * HOUR_MS),
                           ("ETHUSDT", "1h", T0_MS, T0_MS + 48 * HOUR_MS)]
        cost = rebuild.fetch_cost(windows)
        assert (cost.candles, cost.requests, cost.weight) == (52, 2, 4)
        assert cost.minutes_at(6000) == 4 / 6000

    def test_after_a_rebuild_only_the_lost_candles_are_refetched(self, damaged, tmp_path: Path) -> None:
        db, before, _ = damaged
        result = rebuild.rebuild(db, tmp_path / "rebuilt.db", cli=None)
        now_ms = T0_MS + 400 * HOUR_MS
        with Store(f"sqlite:///{result.target}") as store:
            windows = rebuild.refetch_windows(store, list(SYMBOLS), ["1h"], initial_history_days=17, now_ms=now_ms)
        missing = before["ohlcv_h1"] - rows(result.target, "SELECT * FROM ohlcv_h1")
        early = [w for w in windows if w[2] < T0_MS]  # 17 days reach 8 h before the first candle stored
        assert early == [(s, "1h", T0_MS - 8 * HOUR_MS, T0_MS) for s in SYMBOLS]
        later = [w for w in windows if w[2] >= T0_MS]
        assert rebuild.fetch_cost(later).candles == len(missing)
        assert {w[0] for w in later} == {r[0] for r in missing}


def test_faults_corrupt_pages_is_salvaged_too(tmp_path: Path) -> None:
    """The project's own fault injection, then a rebuild: some rows lost, the rest back."""
    settings = make_settings(tmp_path)
    fill(settings.db_path)
    total = len(rows(settings.db_path, "SELECT * FROM ohlcv_h1"))
    faults.corrupt_pages(settings, table="ohlcv_h1", pages=1)
    result = rebuild.rebuild(settings.db_path, tmp_path / "rebuilt.db", cli=None)
    assert 0 < result.tables["ohlcv_h1"].recovered < total
