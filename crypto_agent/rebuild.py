"""No backup is not a dead end: a fresh store rebuilt from every readable row of a corrupt one.

`rebuild(corrupt, target)` salvages each table of the project's schema from a corrupt SQLite file
into a new store at `target`, with the sqlite3 CLI's `.recover` (Debian's `sqlite3` package) when it
is installed and works, otherwise by walking each table's key in order and stepping over the pages
that cannot be read. The corrupt file is never opened (both read a scratch copy, with its WAL); the new store
is built beside the target and renamed into place once it passes quick_check. The result says per
table how many rows came back and what could not be read. `refetch_windows()` then lists the
candle windows the exchange must fill again: the universe x timeframes x initial history, minus
what was salvaged.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crypto_agent.collector import Window, plan_windows
from crypto_agent.errors import CryptoAgentError
from crypto_agent.exchange import ENDPOINT_WEIGHTS, KLINES_MAX_LIMIT
from crypto_agent.keywalk import walk_int_key
from crypto_agent.schema import OHLCV_TABLES, metadata
from crypto_agent.store import Store
from crypto_agent.universe import UNIVERSE, timeframe

CLI_METHOD = "sqlite3 .recover"
WALK_METHOD = "key walk"
CLI_TIMEOUT_S = 1800.0
BATCH_ROWS = 5000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LOST_AND_FOUND = "lost_and_found"


class RebuildError(CryptoAgentError):
    """The rebuild could not start or finish; the corrupt file is untouched and no target was left behind."""


@dataclass
class TableSalvage:
    """One table: rows written into the fresh store, rows read but refused (a constraint), what was unreadable."""

    recovered: int = 0
    rejected: int = 0
    unreadable: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether nothing of the table is known to be lost: no unreadable range, no damaged row refused."""
        return not self.unreadable and not self.rejected

    @property
    def loss(self) -> str:
        """What of the table is lost, in words: its unreadable ranges and the damaged rows refused."""
        lost = [f"{len(self.unreadable)} unreadable range(s)"] if self.unreadable else []
        lost += [f"{self.rejected} damaged row(s) refused"] if self.rejected else []
        return ", ".join(lost) or "nothing"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"recovered": self.recovered, "rejected": self.rejected, "unreadable": list(self.unreadable)}


@dataclass
class RebuildResult:
    """A fresh store built from a corrupt file: how, and per table what came back and what did not."""

    source: Path
    target: Path
    method: str  # CLI_METHOD or WALK_METHOD
    tables: dict[str, TableSalvage]
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. why the CLI was not used
    orphans: int = 0  # rows .recover found but could not attribute to a table (its lost_and_found)

    @property
    def complete(self) -> bool:
        """Whether every table was read without a damaged page."""
        return all(t.complete for t in self.tables.values())

    @property
    def recovered(self) -> int:
        """Rows written into the fresh store, all tables."""
        return sum(t.recovered for t in self.tables.values())

    @property
    def damaged_tables(self) -> list[str]:
        """The tables with something unreadable or refused, sorted."""
        return sorted(n for n, t in self.tables.items() if not t.complete)

    @property
    def summary(self) -> str:
        """One line for an operator (and L2): rows rebuilt, and what is lost, if anything."""
        head = f"rebuilt {self.target.name} from {self.source.name} by {self.method}: {self.recovered} rows"
        if self.complete:
            return head + ", nothing found unreadable"
        parts = [f"{n} ({self.tables[n].recovered} rows kept, {self.tables[n].loss})" for n in self.damaged_tables]
        return head + "; lost in " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the incident)."""
        return {"source": str(self.source), "target": str(self.target), "method": self.method,
                "seconds": round(self.seconds, 3), "complete": self.complete, "recovered": self.recovered,
                "orphans": self.orphans, "notes": list(self.notes),
                "tables": {n: t.to_dict() for n, t in sorted(self.tables.items())}}


# --- the fresh store ---


def _fresh_store(path: Path) -> list[str]:
    """Create an empty store with the project's schema at path; its table names."""
    store = Store(f"sqlite:///{path}")
    store.close()
    return [t.name for t in metadata.sorted_tables]


def _connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection that never writes to (or checkpoints into) the file."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    """The column names of a table (empty when it does not exist)."""
    return [str(r[1]) for r in conn.execute(f'PRAGMA table_info("{table}")')]


class _Writer:
    """Buffered INSERT OR IGNORE of one table's rows into the fresh store, counting what landed."""

    def __init__(self, conn: sqlite3.Connection, table: str, columns: list[str], salvage: TableSalvage) -> None:
        cols = ", ".join(f'"{c}"' for c in columns)
        self.sql = f'INSERT OR IGNORE INTO "{table}" ({cols}) VALUES ({", ".join("?" * len(columns))})'
        self.conn, self.salvage, self.width = conn, salvage, len(columns)
        self.rows: list[tuple] = []

    def keep(self, row: tuple) -> None:
        """Queue one row (its first `width` values)."""
        self.rows.append(tuple(row[: self.width]))
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the queued rows in one transaction; a row a constraint refuses is counted as rejected."""
        if not self.rows:
            return
        before = self.conn.total_changes
        self.conn.execute("BEGIN")
        try:
            self.conn.executemany(self.sql, self.rows)
        except sqlite3.Error:  # a damaged value SQLite will not store (a datatype mismatch): row by row
            self.conn.execute("ROLLBACK")
            self._flush_one_by_one()
        else:
            self.conn.execute("COMMIT")
            landed = self.conn.total_changes - before
            self.salvage.recovered += landed
            self.salvage.rejected += len(self.rows) - landed
        self.rows.clear()

    def _flush_one_by_one(self) -> None:
        """Write the queued rows one at a time, counting each that lands or is refused."""
        self.conn.execute("BEGIN")
        for row in self.rows:
            try:
                changed = self.conn.execute(self.sql, row).rowcount
            except sqlite3.Error:
                changed = 0
            if changed:
                self.salvage.recovered += 1
            else:
                self.salvage.rejected += 1
        self.conn.execute("COMMIT")


# --- the CLI's .recover ---


def cli_recover_works(cli: str | None = "sqlite3", timeout_s: float = 30.0) -> bool:
    """Whether this sqlite3 CLI can `.recover` at all (Debian 12's 3.40 cannot: it lacks sqlite_dbpage)."""
    path = shutil.which(cli) if cli else None
    if path is None:
        return False
    with tempfile.TemporaryDirectory(prefix="crypto-agent-recover-probe-") as tmp:
        probe = Path(tmp) / "probe.db"
        conn = sqlite3.connect(probe)
        conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        conn.close()
        try:
            done = subprocess.run([path, str(probe), ".recover"], capture_output=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0 and b"INSERT" in done.stdout


def _scratch_copy(source: Path, scratch: Path) -> Path:
    """A copy of the corrupt file and its WAL (the newest pages may live there) to read; the input stays as it is."""
    copy = scratch / "corrupt-copy.db"
    shutil.copyfile(source, copy)
    wal = source.with_name(source.name + "-wal")
    if wal.exists():
        shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
    return copy


def _run_cli_recover(cli: str, copy: Path, scratch: Path, timeout_s: float) -> Path:
    """`.recover` the scratch copy and replay its SQL (through stdin) into a new file; that file.

    RebuildError with the CLI's message when either step fails.
    """
    sql_path = scratch / "recover.sql"
    try:
        with sql_path.open("wb") as out:
            done = subprocess.run([cli, str(copy), ".recover"], stdout=out, stderr=subprocess.PIPE,
                                  timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RebuildError(f"{cli} .recover failed (exit {done.returncode}): "
                               f"{done.stderr.decode('utf-8', 'replace').strip()[:300]}")
        recovered = scratch / "recovered.db"
        with sql_path.open("rb") as sql_in:
            replay = subprocess.run([cli, str(recovered)], stdin=sql_in, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RebuildError(f"{cli} .recover took over {timeout_s:g} s") from None
    except OSError as exc:
        raise RebuildError(f"cannot run {cli}: {exc}") from None
    if replay.returncode != 0 or not recovered.is_file():
        raise RebuildError(f"replaying the .recover SQL failed (exit {replay.returncode}): "
                           f"{replay.stderr.decode('utf-8', 'replace').strip()[:300]}")
    return recovered


def _damage_of(conn: sqlite3.Connection, table: str) -> str | None:
    """Why the table's pages are damaged in the corrupt file, or None when every page is sound and reads.

    A full read alone is not enough: SQLite masks a cell offset into its page, so a leaf whose cell
    pointers were overwritten can read as rows of garbage without an error (and which, depends on
    memory beyond the page). `PRAGMA quick_check(table)` checks the b-tree's own structure and says so.
    """
    try:
        problems = [str(r[0]) for r in conn.execute(f'PRAGMA quick_check("{table}")')]
        if problems != ["ok"]:
            return "DatabaseError: database disk image is malformed"  # as a read that meets the damage says
        for _ in conn.execute(f'SELECT * FROM "{table}"'):
            pass
        return None
    except sqlite3.DatabaseError as exc:
        return f"{type(exc).__name__}: {exc}"


def _from_recovered(recovered: Path, source: Path, fresh: sqlite3.Connection, tables: list[str]) -> tuple[
        dict[str, TableSalvage], int]:
    """Copy each schema table out of the .recover result into the fresh store; (per table, orphan rows).

    `source` is the scratch copy of the corrupt file, read again to tell which tables are damaged.
    """
    out: dict[str, TableSalvage] = {}
    src = _connect_ro(recovered)
    try:
        corrupt = sqlite3.connect(source, isolation_level=None)
    except sqlite3.Error:
        corrupt = None
    try:
        for table in tables:
            salvage = out[table] = TableSalvage()
            have = _columns(src, table)
            cols = [c for c in _columns(fresh, table) if c in have]
            if not cols:
                salvage.unreadable.append("table not found by .recover: every row lost")
                continue
            writer = _Writer(fresh, table, cols, salvage)
            for row in src.execute(f'SELECT {", ".join(repr_col(c) for c in cols)} FROM "{table}"'):
                writer.keep(row)
            writer.flush()
            damage = _damage_of(corrupt, table) if corrupt is not None else "the corrupt file does not open"
            if damage is not None:
                salvage.unreadable.append(f"damaged pages ({damage}): .recover kept what they still held, "
                                          "the number of rows lost is unknown")
        orphans = int(src.execute(f'SELECT count(*) FROM "{LOST_AND_FOUND}"').fetchone()[0]) \
            if _columns(src, LOST_AND_FOUND) else 0
    finally:
        src.close()
        if corrupt is not None:
            corrupt.close()
    return out, orphans


def repr_col(name: str) -> str:
    """A column name quoted for SQL."""
    return '"' + name.replace('"', '""') + '"'


# --- the walk, when the CLI is missing or fails ---


def _symbols_of(conn: sqlite3.Connection, table: str, known: Iterable[str]) -> list[str]:
    """The symbols to walk: the known ones, and those found by seeking symbol after symbol (up to damage)."""
    found = set(known)
    last = ""
    for _ in range(100_000):
        try:
            row = conn.execute(f'SELECT symbol FROM "{table}" WHERE symbol > ? ORDER BY symbol LIMIT 1',
                               (last,)).fetchone()
        except sqlite3.DatabaseError:
            break
        if row is None:
            break
        last = str(row[0])
        found.add(last)
    return sorted(found)


def _has_rowid(conn: sqlite3.Connection, table: str) -> bool:
    """Whether the table has a rowid (it is not WITHOUT ROWID)."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return not (row and row[0] and "WITHOUT ROWID" in " ".join(str(row[0]).upper().split()))


def _walk_table(src: sqlite3.Connection, fresh: sqlite3.Connection, table: str, symbols: Iterable[str]) -> TableSalvage:
    """Salvage one table from the corrupt file by walking its key."""
    salvage = TableSalvage()
    try:
        have = _columns(src, table)
        rowid = _has_rowid(src, table)
    except sqlite3.DatabaseError as exc:
        salvage.unreadable.append(f"schema unreadable ({exc}): every row lost")
        return salvage
    cols = [c for c in _columns(fresh, table) if c in have]
    if not cols:
        salvage.unreadable.append("table missing from the corrupt file: every row lost")
        return salvage
    writer = _Writer(fresh, table, cols, salvage)
    col_sql = ", ".join(repr_col(c) for c in cols)
    if rowid:
        sql = f'SELECT {col_sql}, rowid FROM "{table}" WHERE 1'
        for a, b in walk_int_key(src, sql, (), "rowid", len(cols), INT64_MIN, INT64_MAX, writer.keep):
            salvage.unreadable.append(f"rowid in [{a}, {b})" if b < INT64_MAX else f"rowid from {a}")
    elif "symbol" in cols and "timestamp" in cols:
        t = cols.index("timestamp")
        sql = f'SELECT {col_sql} FROM "{table}" WHERE symbol = ?'
        for symbol in _symbols_of(src, table, symbols):
            for a, b in walk_int_key(src, sql, (symbol,), '"timestamp"', t, INT64_MIN, INT64_MAX, writer.keep):
                salvage.unreadable.append(f"{symbol} timestamp in [{a}, {b})" if b < INT64_MAX
                                          else f"{symbol} timestamp from {a}")
    else:
        try:
            for row in src.execute(f'SELECT {col_sql} FROM "{table}"'):
                writer.keep(row)
        except sqlite3.DatabaseError as exc:
            salvage.unreadable.append(f"damaged ({exc}), and its key cannot be walked: only the rows before it")
    writer.flush()
    return salvage


def _walk_all(source: Path, fresh: sqlite3.Connection, tables: list[str], symbols: Iterable[str]) -> dict[
        str, TableSalvage]:
    """Salvage every schema table from (the scratch copy of) the corrupt file by key walks."""
    try:
        src = sqlite3.connect(source, isolation_level=None)
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        return {t: TableSalvage(unreadable=[f"the file does not open as SQLite ({exc}): every row lost"])
                for t in tables}
    try:
        return {t: _walk_table(src, fresh, t, symbols) for t in tables}
    finally:
        src.close()


# --- the rebuild ---


def rebuild(
    corrupt_db: Path | str,
    target_db: Path | str,
    *,
    cli: str | None = "sqlite3",
    symbols: Sequence[str] = UNIVERSE,
    timeout_s: float = CLI_TIMEOUT_S,
) -> RebuildResult:
    """Build a fresh store at target_db from every readable row of corrupt_db; what came back, per table.

    Tries the sqlite3 CLI's `.recover` (cli=None: do not), and walks the keys itself when the CLI
    is missing or fails. corrupt_db is never written; target_db must not exist yet. `symbols`
    are walked in the candle tables even when the damage hides them.
    """
    started = time.perf_counter()
    source, target = Path(corrupt_db), Path(target_db)
    if not source.is_file():
        raise RebuildError(f"nothing to rebuild from: {source} does not exist",
                           hint="point at the corrupt database (in the quarantine folder)")
    if target.exists() or target.resolve() == source.resolve():
        raise RebuildError(f"{target} already exists: a rebuild never overwrites a database",
                           hint="quarantine or remove it first, or choose another target")
    target.parent.mkdir(parents=True, exist_ok=True)
    building = target.with_name(f".{target.name}.rebuilding")
    scratch = Path(tempfile.mkdtemp(prefix=".rebuild-", dir=target.parent))
    notes: list[str] = []
    try:
        for leftover in (building, building.with_name(building.name + "-wal"),
                         building.with_name(building.name + "-shm")):
            leftover.unlink(missing_ok=True)
        copy = _scratch_copy(source, scratch)
        tables = _fresh_store(building)
        fresh = sqlite3.connect(building, isolation_level=None)
        try:
            fresh.execute("PRAGMA journal_mode=DELETE")
            fresh.execute("PRAGMA synchronous=OFF")  # a crash leaves only the scratch file behind
            fresh.execute("PRAGMA cache_size=-65536")  # 64 MB: the b-trees grow without rereading their pages
            method, orphans, salvaged = WALK_METHOD, 0, None
            cli_path = shutil.which(cli) if cli else None
            if cli and cli_path is None:
                notes.append(f"the {cli} CLI is not installed (Debian: apt-get install sqlite3): walked the keys")
            elif cli_path is not None:
                try:
                    recovered = _run_cli_recover(cli_path, copy, scratch, timeout_s)
                    salvaged, orphans = _from_recovered(recovered, copy, fresh, tables)
                    method = CLI_METHOD
                except (RebuildError, sqlite3.Error) as exc:
                    why = exc.message if isinstance(exc, RebuildError) else f"reading the .recover result failed: {exc}"
                    notes.append(f"{why}: walked the keys instead")
                    for t in tables:  # start over from an empty table
                        fresh.execute(f'DELETE FROM "{t}"')
            if salvaged is None:
                salvaged = _walk_all(copy, fresh, tables, symbols)
            problems = [str(r[0]) for r in fresh.execute("PRAGMA quick_check")]
        finally:
            fresh.close()
        if problems != ["ok"]:
            raise RebuildError(f"the rebuilt store fails quick_check: {'; '.join(problems)[:300]}",
                               hint="keep the quarantined file and report this; nothing was put in place")
        fd = os.open(building, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(building, target)
        return RebuildResult(source, target, method, salvaged, time.perf_counter() - started, notes, orphans)
    except BaseException:
        for leftover in (building, building.with_name(building.name + "-wal"),
                         building.with_name(building.name + "-shm")):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- what the exchange must fill again ---


def refetch_windows(
    store: Store, symbols: Sequence[str], timeframes: Sequence[str], *, initial_history_days: int, now_ms: int,
) -> list[Window]:
    """The candle windows a rebuilt store lacks: every hole of symbols x timeframes over the initial history."""
    return plan_windows(store, symbols, timeframes, mode="update-all", lookback_hours=initial_history_days * 24,
                        initial_history_days=initial_history_days, now_ms=now_ms)


@dataclass(frozen=True)
class FetchCost:
    """What fetching windows costs at the exchange: candles, requests (pages of 1000) and request weight."""

    candles: int
    requests: int
    weight: int

    def minutes_at(self, weight_per_minute: float) -> float:
        """The least minutes the fetch takes under a weight budget per minute."""
        return self.weight / weight_per_minute if weight_per_minute > 0 else float("inf")


def fetch_cost(windows: Iterable[Window]) -> FetchCost:
    """Candles, kline requests and request weight of fetching the windows."""
    candles = requests = 0
    for _symbol, tf, start, end in windows:
        n = max(0, -(-(end - start) // timeframe(tf).ms))
        candles += n
        requests += -(-n // KLINES_MAX_LIMIT)
    return FetchCost(candles, requests, requests * ENDPOINT_WEIGHTS["/api/v3/klines"])


def candle_tables() -> list[str]:
    """The candle tables, which the exchange can refill (the others only the salvage can)."""
    return [t.name for t in OHLCV_TABLES.values()]
