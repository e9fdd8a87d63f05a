"""Every job store keeps the same promises: commits, order, pruning, counts, clear failures.
The Redis store runs on a real redis-server (tests/redis_server.py), skipped without one."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.jobs import JobRecord, StoreError, open_repository
from tests.redis_server import RedisServer, free_port, require_redis


@pytest.fixture(params=["memory", "sqlite", "redis"])
def repository(request, tmp_path):
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url_for("repository")
    else:
        url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'state' / 'jobs.db'}"
    store = open_repository(url)
    yield store
    store.close()


def record(job_id: str, **fields) -> JobRecord:
    spec = {"n": 1, "steps": 5, "sampler": "ddim", "eta": 0.0, "seed": 7, "preview_every": 0,
            "preview_kinds": ["x_t", "x0"], "timeout_s": None, "owner": None}
    return JobRecord(id=job_id, owner=fields.pop("owner", None), spec=spec, **fields)


def test_records_round_trip_in_acceptance_order(repository):
    for job_id in ("c", "a", "b"):
        repository.add(record(job_id))
    running = repository.get("a")
    running.status, running.attempts = "running", 1
    repository.save(running)
    assert [r.id for r in repository.unfinished()] == ["c", "a", "b"]
    assert repository.get("a").status == "running" and repository.get("a").spec["seed"] == 7
    assert repository.get("nope") is None
    assert repository.counts() == {"queued": 2, "running": 1}


def test_finished_records_expire_and_the_oldest_go_first_past_the_byte_bound(repository):
    now = time.time()
    for index, job_id in enumerate(["old", "mid", "new", "open"]):
        job = record(job_id)
        repository.add(job)
        if job_id != "open":
            job.status, job.finished, job.result = "succeeded", now - 100 + index, "x" * 1000
            repository.save(job)
    assert repository.prune(finished_before=now - 99.5, max_bytes=10_000) == 1  # "old" expired
    assert repository.prune(finished_before=0, max_bytes=1500) == 1  # "mid" goes: 2000 bytes > 1500
    assert [r for r in ("old", "mid", "new", "open") if repository.get(r)] == ["new", "open"]
    repository.delete("new")
    assert repository.get("new") is None and repository.counts() == {"queued": 1}


def test_a_sqlite_store_survives_its_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = open_repository(url)
    first.add(record("kept"))
    first.close()
    again = open_repository(url)
    assert again.get("kept").id == "kept" and again.durable
    again.close()


def test_a_corrupt_or_unwritable_store_is_one_clear_error(tmp_path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the job store"):
        open_repository(f"sqlite:///{corrupt}")
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(StoreError, match="cannot open the job store"):
        open_repository(f"sqlite:///{blocked / 'jobs.db'}")
    with pytest.raises(StoreError, match="unknown job store"):
        open_repository("postgres://somewhere")


def test_a_finished_record_keeps_every_field(repository):
    job = record("done", owner="key-abc", created=1000.25)
    repository.add(job)
    job.status, job.attempts, job.finished = "failed", 2, 1234.5
    job.error = {"code": "interrupted", "message": "interrupted 2 times — ünïcode"}
    repository.save(job)
    again = repository.get("done")
    assert (again.owner, again.status, again.attempts, again.created, again.finished, again.error, again.result) == \
        ("key-abc", "failed", 2, 1000.25, 1234.5, job.error, None)
    assert again.seq == job.seq >= 1 and again.spec == job.spec


def test_a_deleted_record_is_not_saved_back(repository):
    """DELETE /jobs/{id} while the job's follower still writes its outcome: it stays deleted."""
    job = record("gone")
    repository.add(job)
    repository.delete("gone")
    job.status, job.finished, job.result = "succeeded", time.time(), "x" * 10
    repository.save(job)
    assert repository.get("gone") is None and repository.counts() == {}
    assert repository.prune(finished_before=0, max_bytes=0) == 0


def test_prune_keeps_unfinished_records_whatever_the_bound(repository):
    for job_id in ("queued", "succeeded"):
        repository.add(record(job_id))
    done = repository.get("succeeded")
    done.status, done.finished, done.result = "succeeded", time.time(), "y" * 5000
    repository.save(done)
    assert repository.prune(finished_before=0, max_bytes=100) == 1
    assert repository.prune(finished_before=time.time() + 100, max_bytes=0) == 0
    assert [r.id for r in repository.unfinished()] == ["queued"] and repository.counts() == {"queued": 1}


# ---- Redis: shared by replicas, its failures clear ----


def redis_store(url: str):
    store = open_repository(url)
    assert type(store).__name__ == "RedisRepository" and store.durable
    return store


def test_two_redis_stores_on_one_server_share_records_and_one_acceptance_order(redis_server):
    url = redis_server.url_for("replicas")
    first, second = redis_store(url), redis_store(url)
    for index in range(6):
        (first if index % 2 == 0 else second).add(record(f"job{index}"))
    assert [r.id for r in first.unfinished()] == [r.id for r in second.unfinished()] == [f"job{i}" for i in range(6)]
    assert [r.seq for r in second.unfinished()] == sorted({r.seq for r in first.unfinished()})
    running = second.get("job0")
    running.status, running.attempts = "running", 1
    second.save(running)
    assert first.get("job0").status == "running" and first.counts() == {"queued": 5, "running": 1}
    with pytest.raises(StoreError, match="already stored"):
        first.add(record("job1"))  # another replica's id is never overwritten
    assert second.get("job1").seq == first.get("job1").seq and first.counts() == {"queued": 5, "running": 1}
    retried = record("job6")  # the same add sent again (its reply lost): the same record, one seq
    first.add(retried)
    seq = retried.seq
    first.add(retried)
    assert retried.seq == seq and first.counts() == {"queued": 6, "running": 1}
    other = redis_store(redis_server.url_for("elsewhere"))  # another prefix: another store
    assert other.get("job0") is None and other.counts() == {}
    for store in (first, second, other):
        store.close()


def test_concurrent_adds_from_many_clients_get_distinct_seqs(redis_server):
    url = redis_server.url_for("concurrent")
    stores = [redis_store(url) for _ in range(4)]
    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda i: (stores[i % 4].add(job := record(f"c{i}")), job)[1], range(80)))
    assert sorted(job.seq for job in jobs) == sorted({job.seq for job in jobs}) and len(jobs) == 80
    assert [r.seq for r in stores[0].unfinished()] == sorted(job.seq for job in jobs)
    assert stores[1].counts() == {"queued": 80}
    for store in stores:
        store.close()


def test_the_redis_store_survives_a_redis_restart_with_its_counts_and_bytes(tmp_path):
    require_redis()
    with RedisServer(tmp_path / "redis", persistent=True) as server:
        url = server.url_for("restart")
        store = redis_store(url)
        for job_id in ("a", "b", "c"):
            store.add(record(job_id))
        done = store.get("b")
        done.status, done.finished, done.result = "succeeded", time.time(), "z" * 700
        store.save(done)
        server.stop(kill=True)  # kill -9: the append-only file has every write
        with pytest.raises(StoreError, match=r"job store redis://127\.0\.0\.1"):
            store.get("a")
        server.start()
        assert store.counts() == {"queued": 2, "succeeded": 1}  # the same object reconnects
        assert [r.id for r in store.unfinished()] == ["a", "c"] and store.get("b").result == "z" * 700
        assert store.prune(finished_before=0, max_bytes=699) == 1 and store.counts() == {"queued": 2}
        again = redis_store(url)
        again.add(record("d"))
        assert [r.id for r in again.unfinished()] == ["a", "c", "d"]
        store.close()
        again.close()


def test_a_redis_store_that_is_down_is_one_clear_error_naming_the_url(tmp_path):
    require_redis()
    port = free_port()  # nothing listens there
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    with pytest.raises(StoreError) as opened:
        open_repository(url)
    message = str(opened.value)
    assert message.startswith(f"cannot open the job store redis://:***@127.0.0.1:{port}/0: ")
    assert "hunter2" not in message and "\n" not in message
    with RedisServer(tmp_path / "redis") as server:
        store = redis_store(server.url_for("down"))
        store.add(record("a"))
        server.stop()
        for call in (lambda: store.add(record("b")), lambda: store.get("a"), store.unfinished, store.counts,
                     lambda: store.save(record("a")), lambda: store.delete("a"), lambda: store.prune(0, 10)):
            with pytest.raises(StoreError, match=rf"^job store redis://127\.0\.0\.1:{server.port}/0\?prefix=down-"):
                call()
        store.close()


def test_a_password_never_appears_in_the_redis_store_messages(tmp_path):
    require_redis()
    with RedisServer(tmp_path / "redis", password="s3cret-pw") as server:
        store = redis_store(server.url_for("auth"))  # the right password
        store.add(record("a"))
        assert store.get("a").id == "a"
        store.close()
        wrong = f"redis://:not-the-pw@127.0.0.1:{server.port}/0"
        with pytest.raises(StoreError, match="cannot open the job store") as refused:
            open_repository(wrong)
        assert "not-the-pw" not in str(refused.value) and ":***@" in str(refused.value)
        with pytest.raises(StoreError) as unauthenticated:
            open_repository(f"redis://127.0.0.1:{server.port}/0")
        assert "cannot open the job store redis://127.0.0.1" in str(unauthenticated.value)
    query = "unix:///nonexistent/redis.sock?password=t0psecret&db=0"
    with pytest.raises(StoreError) as by_query:
        open_repository(query)
    assert "t0psecret" not in str(by_query.value) and "password=***" in str(by_query.value)


def test_without_the_redis_package_a_redis_url_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(StoreError, match=r"redis:// needs the redis package: pip install 'ddpm-serve\[redis\]'"):
        open_repository("redis://127.0.0.1:6379/0")


def test_a_job_is_claimed_by_one_live_server_at_a_time(repository):
    """Leases: a server takes unfinished jobs that nobody holds, its own, or those whose lease ran out."""
    now = time.time()
    repository.add(record("free"))
    repository.add(record("held-by-a", worker="a", lease_until=now + 60))
    repository.add(record("expired", worker="c", lease_until=now - 1))
    assert [r.id for r in repository.claim("b", now, now + 30)] == ["free", "expired"]
    # b's own, again: a restart under the same name takes them back at once
    assert [r.id for r in repository.claim("b", now, now + 30)] == ["free", "expired"]
    assert [r.id for r in repository.claim("a", now, now + 30)] == ["held-by-a"]
    assert repository.claim("c", now, now + 30) == []  # everything is held by a live server
    repository.renew("a", now + 120)
    assert repository.get("held-by-a").lease_until == pytest.approx(now + 120)
    assert [r.id for r in repository.claim("c", now + 60, now + 90)] == ["free", "expired"]  # b stopped renewing
