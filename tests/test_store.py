"""The market-data store on real SQLite files: upserts, pragmas, queries, integrity checks, errors."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import text

from crypto_agent.errors import StoreCorrupt, StoreError, StoreUnreadable
from crypto_agent.store import (
    BUSY_TIMEOUT_MS,
    Candle,
    Store,
    candle_from_kline,
    check_integrity,
)

HOUR = 3_600_000
T0 = 1_790_000_000_000 // (4 * HOUR) * (4 * HOUR)


def h1_candles(n: int, start: int = T0, price: float = 100.0) -> list[Candle]:
    """n consecutive H1 candles from `start`, with values that depend on their index."""
    return [
        (start + i * HOUR, price + i, price + i + 1, price + i - 1, price + i + 0.5, 10.0 + i,
         start + (i + 1) * HOUR - 1, (10.0 + i) * price, 100 + i)
        for i in range(n)
    ]


@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}")
    yield s
    s.close()


def _filled_file(tmp_path: Path, symbols: int = 4, rows: int = 5000) -> Path:
    """A closed, checkpointed database file with symbols x rows H1 candles."""
    path = tmp_path / "filled.db"
    s = Store(f"sqlite:///{path}")
    for i in range(symbols):
        s.upsert_candles(f"SYM{i}USDT", "1h", h1_candles(rows, price=10.0 * (i + 1)))
    s.close()
    # Closing the last connection checkpoints the WAL into the main file; corrupting the main
    # file only means something if nothing of the data still waits in the WAL.
    assert not (tmp_path / "filled.db-wal").exists()
    return path


def _page_geometry(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA page_size").fetchone()[0], conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()


class TestUpsert:
    def test_same_rows_twice_are_stored_once(self, store: Store) -> None:
        candles = h1_candles(100)
        assert store.upsert_candles("BTCUSDT", "1h", candles) == 100
        assert store.upsert_candles("BTCUSDT", "1h", candles) == 100
        assert store.count("1h") == 100
        assert store.count("1h", "BTCUSDT") == 100

    def test_updated_values_win(self, store: Store) -> None:
        store.upsert_candles("BTCUSDT", "1h", h1_candles(50))
        changed = [(c[0], 1.0, 2.0, 0.5, 1.5, 999.0, c[6], 7.0, 3) for c in h1_candles(50)[10:20]]
        store.upsert_candles("BTCUSDT", "1h", changed)
        df = store.candles("BTCUSDT", "1h")
        assert len(df) == 50
        assert (df["volume"].iloc[10:20] == 999.0).all()
        assert (df["trades"].iloc[10:20] == 3).all()
        assert df["volume"].iloc[9] == 19.0 and df["volume"].iloc[20] == 30.0

    def test_symbols_and_timeframes_are_kept_apart(self, store: Store) -> None:
        store.upsert_candles("BTCUSDT", "1h", h1_candles(10))
        store.upsert_candles("ETHUSDT", "1h", h1_candles(5))
        store.upsert_candles("BTCUSDT", "4h", [(T0, 1.0, 1.0, 1.0, 1.0, 1.0, T0 + 4 * HOUR - 1, 1.0, 1)])
        assert store.count("1h", "BTCUSDT") == 10
        assert store.count("1h", "ETHUSDT") == 5
        assert store.count("4h") == 1

    def test_empty_batch_writes_nothing(self, store: Store) -> None:
        assert store.upsert_candles("BTCUSDT", "1h", []) == 0
        assert store.count("1h") == 0

    def test_a_bad_row_fails_the_whole_batch_with_store_error(self, store: Store) -> None:
        candles = h1_candles(20)
        candles[15] = (candles[15][0], None, 1.0, 1.0, 1.0, 1.0, candles[15][6], 1.0, 1)  # NOT NULL open
        with pytest.raises(StoreError, match="writing 20 1h candles of BTCUSDT failed"):
            store.upsert_candles("BTCUSDT", "1h", candles)
        assert store.count("1h") == 0

    def test_candle_from_kline_converts_binance_strings(self) -> None:
        kline = [T0, "1.5", "2.5", "1.0", "2.0", "100.25", T0 + HOUR - 1, "200.5", 42, "50", "60", "0"]
        assert candle_from_kline(kline) == (T0, 1.5, 2.5, 1.0, 2.0, 100.25, T0 + HOUR - 1, 200.5, 42)


class TestQueries:
    def test_candles_frame_is_indexed_by_utc_open_time_oldest_first(self, store: Store) -> None:
        store.upsert_candles("BTCUSDT", "1h", list(reversed(h1_candles(30))))
        df = store.candles("BTCUSDT", "1h", start_ms=T0 + 5 * HOUR, end_ms=T0 + 15 * HOUR)
        assert len(df) == 10
        assert df.index[0] == pd.Timestamp(T0 + 5 * HOUR, unit="ms", tz="UTC")
        assert df.index.is_monotonic_increasing
        assert list(df.columns[:3]) == ["symbol", "timestamp", "open"]
        assert df["open"].iloc[0] == 105.0

    def test_candles_of_an_unknown_symbol_is_an_empty_frame(self, store: Store) -> None:
        assert store.candles("NOPEUSDT", "1h").empty

    def test_newest_by_symbol_seeks_every_symbol(self, store: Store) -> None:
        store.upsert_candles("BTCUSDT", "1h", h1_candles(30))
        store.upsert_candles("AAVEUSDT", "1h", h1_candles(3))
        store.upsert_candles("ZECUSDT", "1h", h1_candles(7, start=T0 + 100 * HOUR))
        assert store.newest_by_symbol("1h") == {
            "AAVEUSDT": T0 + 2 * HOUR, "BTCUSDT": T0 + 29 * HOUR, "ZECUSDT": T0 + 106 * HOUR,
        }
        assert store.newest_by_symbol("4h") == {}
        assert store.newest_open_time("BTCUSDT", "1h") == T0 + 29 * HOUR
        assert store.newest_open_time("ETHUSDT", "1h") is None

    def test_open_times_are_sorted_and_half_open(self, store: Store) -> None:
        store.upsert_candles("BTCUSDT", "1h", h1_candles(10))
        assert store.open_times("BTCUSDT", "1h", T0 + 2 * HOUR, T0 + 5 * HOUR) == [
            T0 + 2 * HOUR, T0 + 3 * HOUR, T0 + 4 * HOUR,
        ]

    def test_open_times_all_from_a_start(self, store: Store) -> None:
        store.upsert_candles("ETHUSDT", "1h", h1_candles(4))
        store.upsert_candles("BTCUSDT", "1h", h1_candles(4))
        df = store.open_times_all("1h", start_ms=T0 + 2 * HOUR)
        assert list(df.itertuples(index=False, name=None)) == [
            ("BTCUSDT", T0 + 2 * HOUR), ("BTCUSDT", T0 + 3 * HOUR),
            ("ETHUSDT", T0 + 2 * HOUR), ("ETHUSDT", T0 + 3 * HOUR),
        ]


class TestPragmas:
    def test_wal_mode_is_on(self, store: Store, tmp_path: Path) -> None:
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        # WAL is a property of the file: another client sees it too.
        raw = sqlite3.connect(tmp_path / "db" / "crypto_agent.db")
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            raw.close()

    def test_busy_timeout_is_set(self, store: Store) -> None:
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == BUSY_TIMEOUT_MS
        assert BUSY_TIMEOUT_MS >= 5000


class TestIntegrity:
    def test_quick_and_full_are_ok_on_a_good_file(self, tmp_path: Path) -> None:
        path = _filled_file(tmp_path)
        quick = check_integrity(path)
        full = check_integrity(path, full=True)
        assert quick.ok and quick.mode == "quick_check" and quick.problems == []
        assert full.ok and full.mode == "integrity_check" and full.problems == []

    def test_store_method_checks_its_own_file(self, store: Store) -> None:
        store.upsert_candles("BTCUSDT", "1h", h1_candles(10))
        assert store.check_integrity().ok
        assert store.check_integrity(full=True).mode == "integrity_check"

    @pytest.mark.parametrize("full", [False, True], ids=["quick", "full"])
    def test_damaged_cells_in_a_middle_page_are_listed(self, tmp_path: Path, full: bool) -> None:
        path = _filled_file(tmp_path)
        page_size, page_count = _page_geometry(path)
        page = page_count // 2
        with path.open("r+b") as f:  # overwrite part of the page's cells, keep its header
            f.seek((page - 1) * page_size + page_size // 4)
            f.write(b"\xff" * (page_size // 16))
        result = check_integrity(path, full=full)
        assert not result.ok
        assert any(f"page {page}" in p for p in result.problems), result.problems

    @pytest.mark.parametrize("full", [False, True], ids=["quick", "full"])
    def test_garbage_over_a_whole_middle_page_is_not_ok(self, tmp_path: Path, full: bool) -> None:
        path = _filled_file(tmp_path)
        page_size, page_count = _page_geometry(path)
        garbage = random.Random(7).randbytes(page_size)
        with path.open("r+b") as f:
            f.seek((page_count // 2 - 1) * page_size)
            f.write(garbage)
        result = check_integrity(path, full=full)
        assert not result.ok
        assert result.problems and any("malformed" in p for p in result.problems), result.problems

    @pytest.mark.parametrize("full", [False, True], ids=["quick", "full"])
    def test_a_truncated_file_is_not_ok(self, tmp_path: Path, full: bool) -> None:
        path = _filled_file(tmp_path)
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.truncate(size // 2)
        result = check_integrity(path, full=full)
        assert not result.ok
        assert result.problems

    def test_a_file_that_is_not_a_database_is_not_ok(self, tmp_path: Path) -> None:
        path = tmp_path / "notes.db"
        path.write_bytes(b"this is not a database, just text " * 200)
        result = check_integrity(path)
        assert not result.ok
        assert any("not a database" in p for p in result.problems)

    def test_a_missing_file_is_reported_and_not_created(self, tmp_path: Path) -> None:
        path = tmp_path / "absent.db"
        result = check_integrity(path, full=True)
        assert not result.ok
        assert "does not exist" in result.problems[0]
        assert not path.exists()

    def test_check_does_not_change_the_file(self, tmp_path: Path) -> None:
        path = _filled_file(tmp_path)
        before = path.read_bytes()
        assert check_integrity(path, full=True).ok
        assert path.read_bytes() == before

    def test_a_path_with_uri_characters_is_checked(self, tmp_path: Path) -> None:
        folder = tmp_path / "odd?name#1 %20"
        folder.mkdir()
        conn = sqlite3.connect(folder / "x.db")
        conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
        conn.executemany("INSERT INTO t (b) VALUES (?)", [("row",)] * 100)
        conn.commit()
        conn.close()
        assert check_integrity(folder / "x.db").ok
        assert check_integrity(folder / "x.db", full=True).ok


class TestOpenErrors:
    def test_folder_below_a_regular_file_is_a_store_error(self, tmp_path: Path) -> None:
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("x")
        with pytest.raises(StoreError, match="cannot create the database folder") as info:
            Store(f"sqlite:///{blocker / 'db' / 'crypto_agent.db'}")
        assert info.value.hint and "CRYPTO_AGENT_DB_PATH" in info.value.hint

    def test_a_folder_where_the_file_should_be_is_a_store_error(self, tmp_path: Path) -> None:
        folder = tmp_path / "crypto_agent.db"
        folder.mkdir()
        with pytest.raises(StoreUnreadable, match=f"the store {folder} cannot be opened") as info:
            Store(f"sqlite:///{folder}")
        assert isinstance(info.value, StoreError) and info.value.hint and "CRYPTO_AGENT_DB_PATH" in info.value.hint

    def test_a_file_that_is_not_a_database_is_a_store_error(self, tmp_path: Path) -> None:
        path = tmp_path / "text.db"
        path.write_bytes(b"plain text, not SQLite " * 500)
        with pytest.raises(StoreCorrupt, match=r"is corrupt \(file is not a database\)") as info:
            Store(f"sqlite:///{path}")
        assert isinstance(info.value, StoreError) and str(path) in info.value.message
        assert info.value.hint and "crypto-agent check-integrity" in info.value.hint
        assert path.read_bytes().startswith(b"plain text")
