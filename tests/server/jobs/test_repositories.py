"""Every job store keeps the same promises: commits, order, pruning, counts, clear failures."""

from __future__ import annotations

import time

import pytest

from server.jobs import JobRecord, StoreError, open_repository


@pytest.fixture(params=["memory", "sqlite"])
def repository(request, tmp_path):
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
