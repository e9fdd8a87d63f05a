"""What the job store costs: store calls alone, POST /jobs against a live server, and a whole
workload served through jobs with the store in memory and on disk.

    python -m bench.job_store                                  # memory:// and sqlite
    python -m bench.job_store --redis redis://127.0.0.1:6379/0 # and a Redis server you run

1. The store alone: one job's life (add, then two saves: running, then succeeded with a
   ~20 kB result) repeated, per backend: jobs/s and the time of each call.
2. POST /jobs against `ddpm-serve` (a subprocess on loopback; the shipped model, 1000-step
   jobs so the engine only queues them): submissions/s and p50/p99 latency, per backend,
   from 8 concurrent clients.
3. The same workload (--jobs jobs of --steps steps) run to the end through POST /jobs and
   polling, with the store in memory and in SQLite: the ratio is the store's cost (goal <= 2%).
Bounded in count; every server it starts it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.jobs import JobRecord, open_repository
from server.settings import SHIPPED_WEIGHTS
from tests.server.api.live_server import run_server

SPEC = {"n": 1, "steps": 50, "sampler": "ddim", "eta": 0.0, "seed": 1, "preview_every": 0,
        "preview_kinds": ["x_t", "x0"], "timeout_s": None, "owner": None}


def store_alone(url: str, jobs: int) -> str:
    store = open_repository(url)
    result = "x" * 20_000
    began = time.perf_counter()
    for index in range(jobs):
        record = JobRecord(id=f"bench-{index}", owner=None, spec=SPEC)
        store.add(record)
        record.status, record.attempts = "running", 1
        store.save(record)
        record.status, record.finished, record.result = "succeeded", time.time(), result
        store.save(record)
    elapsed = time.perf_counter() - began
    store.close()
    return f"{jobs / elapsed:8.0f} jobs/s   {elapsed / jobs / 3 * 1e6:6.0f} us per call"


async def submissions(url: str, count: int, clients: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def one_client(share: int) -> None:
            for _ in range(share):
                began = time.perf_counter()
                response = await client.post("/jobs", json={"steps": 1000})
                latencies.append(time.perf_counter() - began)
                assert response.status_code == 202, response.text

        began = time.perf_counter()
        await asyncio.gather(*(one_client(count // clients) for _ in range(clients)))
        return (time.perf_counter() - began), latencies


async def workload(url: str, jobs: int, steps: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        began = time.perf_counter()
        ids = [(await client.post("/jobs", json={"steps": steps, "sampler": "ddim", "seed": i})).json()["id"]
               for i in range(jobs)]
        for job_id in ids:
            while (await client.get(f"/jobs/{job_id}")).json()["status"] != "succeeded":
                await asyncio.sleep(0.02)
        return time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help="also measure this Redis server, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--store-jobs", type=int, default=2000)
    parser.add_argument("--submissions", type=int, default=400)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        backends = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/bench.db"}
        if args.redis:
            backends["redis"] = args.redis
        print(f"1. store alone, {args.store_jobs} jobs (add + 2 saves, 20 kB result)")
        for name, url in backends.items():
            print(f"   {name:7s}{store_alone(url, args.store_jobs)}")
        print(f"2. POST /jobs x {args.submissions}, 8 clients, shipped model, against ddpm-serve")
        for name, url in backends.items():
            db = url if name != "sqlite" else f"sqlite:///{tmp}/serve-{name}.db"
            flags = ("--jobs-db", db, "--max-queue", "100000", "--max-jobs", "100000", "--log-level", "warning")
            with run_server(SHIPPED_WEIGHTS, Path(tmp), *flags) as server:
                elapsed, latencies = asyncio.run(submissions(server.url, args.submissions, 8))
            latencies.sort()
            p99 = latencies[int(0.99 * (len(latencies) - 1))]
            print(f"   {name:7s}{len(latencies) / elapsed:8.0f} submissions/s   p50 "
                  f"{statistics.median(latencies) * 1e3:5.1f} ms   p99 {p99 * 1e3:5.1f} ms")
        print(f"3. {args.jobs} jobs x {args.steps} ddim steps to the end, shipped model")
        times = {}
        for name in ("memory", "sqlite", "memory", "sqlite"):  # alternated: the CPU's speed drifts
            db = backends["memory"] if name == "memory" else f"sqlite:///{tmp}/e2e-{time.time_ns()}.db"
            with run_server(SHIPPED_WEIGHTS, Path(tmp), "--jobs-db", db, "--log-level", "warning") as server:
                times.setdefault(name, []).append(asyncio.run(workload(server.url, args.jobs, args.steps)))
        memory, sqlite = min(times["memory"]), min(times["sqlite"])
        print(f"   memory {memory:6.2f} s   sqlite {sqlite:6.2f} s   store cost {100 * (sqlite / memory - 1):+.1f}%")


if __name__ == "__main__":
    sys.exit(main())
