"""The job stores: memory://, sqlite:///path (the default) and redis://host:port/db."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .records import UNFINISHED, JobRecord, JobRepository, StoreError


def open_repository(url: str) -> JobRepository:
    """memory://; sqlite:///relative/path.db or sqlite:////absolute/path.db (SQLAlchemy's form);
    redis://host:port/db (needs the `redis` extra). StoreError says what is wrong."""
    if url == "memory://":
        return MemoryRepository()
    if url.startswith("sqlite:///"):
        return SqliteRepository(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisRepository

        return RedisRepository(url)
    raise StoreError(f"unknown job store {url!r}: use sqlite:///path.db, redis://host:port/db or memory://")


class MemoryRepository:
    """Records in this process only: gone with it (the behaviour before durable jobs)."""

    durable = False

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}
        self.next_seq = 1

    def add(self, record: JobRecord) -> None:
        record.seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.records[record.id] = record

    def save(self, record: JobRecord) -> None:
        if record.id in self.records:  # a deleted job stays deleted, as in the other stores
            self.records[record.id] = record

    def get(self, job_id: str) -> JobRecord | None:
        return self.records.get(job_id)

    def delete(self, job_id: str) -> None:
        self.records.pop(job_id, None)

    def unfinished(self) -> list[JobRecord]:
        return sorted((r for r in self.records.values() if r.unfinished), key=lambda r: r.seq)

    def claim(self, worker: str, now: float, until: float) -> list[JobRecord]:
        claimed = [r for r in self.unfinished() if claimable(r.worker, r.lease_until, worker, now)]
        for record in claimed:
            record.worker, record.lease_until = worker, until
        return claimed

    def renew(self, worker: str, until: float) -> None:
        for record in self.unfinished():
            if record.worker == worker:
                record.lease_until = until

    def prune(self, finished_before: float, max_bytes: int) -> int:
        finished = sorted((r for r in self.records.values() if not r.unfinished), key=lambda r: r.finished)
        total = sum(r.size for r in finished)
        doomed = []
        for record in finished:
            if record.finished < finished_before or total > max_bytes:
                doomed.append(record.id)
                total -= record.size
        for job_id in doomed:
            del self.records[job_id]
        return len(doomed)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.records.values():
            counts[record.status] = counts.get(record.status, 0) + 1
        return counts

    def close(self) -> None:
        pass


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    result TEXT,
    error TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
COLUMNS = "seq, id, owner, spec, status, attempts, created, finished, result, error, worker, lease_until"


class SqliteRepository:
    """One SQLite file in WAL mode. synchronous=NORMAL: a commit survives the process (kill -9,
    an OOM kill); a power cut may lose the last commits. Calls come from the event loop's
    thread; the lock guards the connection should any come from another."""

    durable = True

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            if (check := self.db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise StoreError(f"job store {path} is damaged: {check}")
            self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the job store {path}: {exc}") from None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise StoreError(f"job store {self.path}: {exc}") from None

    def add(self, record: JobRecord) -> None:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO jobs (id, owner, spec, status, attempts, created, worker, lease_until) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (record.id, record.owner, json.dumps(record.spec), record.status,
                                                    record.attempts, record.created, record.worker, record.lease_until))
            record.seq = cursor.lastrowid

    def save(self, record: JobRecord) -> None:
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, attempts = ?, finished = ?, result = ?, error = ?, size = ?, "
                       "worker = ?, lease_until = ? WHERE id = ?",
                       (record.status, record.attempts, record.finished, record.result,
                        json.dumps(record.error) if record.error else None, record.size, record.worker,
                        record.lease_until, record.id))

    def get(self, job_id: str) -> JobRecord | None:
        with self.transaction() as db:
            row = db.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else record_of(row)

    def delete(self, job_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def unfinished(self) -> list[JobRecord]:
        with self.transaction() as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM jobs WHERE status IN (?, ?) ORDER BY seq", UNFINISHED).fetchall()
        return [record_of(row) for row in rows]

    def claim(self, worker: str, now: float, until: float) -> list[JobRecord]:
        with self.transaction() as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM jobs WHERE status IN (?, ?) ORDER BY seq", UNFINISHED).fetchall()
            claimed = [record_of(row) for row in rows if claimable(row[10], row[11], worker, now)]
            db.executemany("UPDATE jobs SET worker = ?, lease_until = ? WHERE id = ?",
                           [(worker, until, record.id) for record in claimed])
        for record in claimed:
            record.worker, record.lease_until = worker, until
        return claimed

    def renew(self, worker: str, until: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE jobs SET lease_until = ? WHERE worker = ? AND status IN (?, ?)", (until, worker, *UNFINISHED))

    def prune(self, finished_before: float, max_bytes: int) -> int:
        with self.transaction() as db:
            expired = db.execute("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?",
                                 (finished_before,)).rowcount
            total = db.execute("SELECT COALESCE(SUM(size), 0) FROM jobs").fetchone()[0]
            doomed = []
            if total > max_bytes:
                for job_id, size in db.execute("SELECT id, size FROM jobs WHERE finished IS NOT NULL ORDER BY finished"):
                    if total <= max_bytes:
                        break
                    doomed.append((job_id,))
                    total -= size
                db.executemany("DELETE FROM jobs WHERE id = ?", doomed)
        return expired + len(doomed)

    def counts(self) -> dict[str, int]:
        with self.transaction() as db:
            return dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def close(self) -> None:
        with self.lock:
            self.db.close()


def record_of(row: tuple) -> JobRecord:
    seq, job_id, owner, spec, status, attempts, created, finished, result, error, worker, lease_until = row
    return JobRecord(id=job_id, owner=owner, spec=json.loads(spec), status=status, seq=seq, attempts=attempts,
                     created=created, finished=finished, result=result, error=json.loads(error) if error else None,
                     worker=worker, lease_until=lease_until)


def claimable(holder: str | None, lease_until: float | None, worker: str, now: float) -> bool:
    """No live server holds it: nobody, this worker in a previous life, or an ended lease."""
    return holder is None or holder == worker or lease_until is None or lease_until < now
