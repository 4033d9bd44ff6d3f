"""Reading a damaged SQLite table in key order, stepping over its damaged pages: the one key walk of the
salvage of newer rows (crypto_agent.backup) and of the store rebuild (crypto_agent.rebuild)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable


def walk_int_key(conn: sqlite3.Connection, select_sql: str, params: tuple, key: str, key_index: int, lo: int,
                  hi: int, keep: Callable[[tuple], None]) -> list[tuple[int, int]]:
    """Read the rows with an integer key in [lo, hi) in key order, stepping over damaged pages; the skipped ranges.

    `select_sql` is a SELECT ... WHERE <condition on params>; the key range and order are added. A
    seek touches only the pages on its path, so after a failure an exponential then binary search
    finds the first start past the damaged page whose first row reads again; only that page's key
    range is given up (and a reverse seek from there takes back the row an index b-tree keeps in
    the interior page above the damage).
    """
    sql = f"{select_sql} AND {key} >= ? AND {key} < ? ORDER BY {key}"
    first_sql = sql + " LIMIT 1"
    last_before_sql = f"{select_sql} AND {key} >= ? AND {key} < ? ORDER BY {key} DESC LIMIT 1"

    def first_row(start: int) -> tuple | None:
        rows = conn.execute(first_sql, (*params, start, hi)).fetchall()
        return rows[0] if rows else None

    def readable(start: int) -> bool:
        try:
            first_row(start)
            return True
        except sqlite3.DatabaseError:
            return False

    def divider(a: int, b: int) -> None:
        """Keep the last row of [a, b) if a reverse seek reads it without the damaged page."""
        try:
            rows = conn.execute(last_before_sql, (*params, a, b)).fetchall()
        except sqlite3.DatabaseError:
            return
        if rows:
            keep(rows[0])

    skipped: list[tuple[int, int]] = []
    pos = lo
    while pos < hi:
        last: int | None = None
        try:
            for row in conn.execute(sql, (*params, pos, hi)):
                keep(row)
                last = int(row[key_index])
            return skipped
        except sqlite3.DatabaseError:
            pass
        bad_from = pos if last is None else last + 1
        try:  # the cursor reads ahead: the row right after the last one handed out may still read
            row = first_row(bad_from)
        except sqlite3.DatabaseError:
            pass
        else:
            if row is None:
                return skipped
            keep(row)
            pos = int(row[key_index]) + 1
            continue
        step = 1
        while bad_from + step < hi and not readable(bad_from + step):
            step *= 2
        if bad_from + step >= hi:
            skipped.append((bad_from, hi))
            return skipped
        failing, good = (bad_from + step // 2 if step > 1 else bad_from), bad_from + step
        while good - failing > 1:
            mid = (failing + good) // 2
            if readable(mid):
                good = mid
            else:
                failing = mid
        skipped.append((bad_from, good))
        divider(bad_from, good)
        pos = good
    return skipped
