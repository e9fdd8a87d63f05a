"""What the Ray cluster test modules share (each module starts and stops its own cluster)."""

from __future__ import annotations

import pytest

from server.settings import Settings


@pytest.fixture(scope="module")
def settings(tiny_weights, tmp_path_factory):
    """The tiny model on 1-thread CPU replicas of 2 lanes; jobs in a SQLite file all nodes of a
    one-machine cluster share."""
    store = tmp_path_factory.mktemp("ray-jobs") / "jobs.db"
    return Settings(weights=tiny_weights, device="cpu", dtype="float32", torch_threads=1, max_batch=2,
                    max_queue=32, max_images_per_request=4, jobs_db=f"sqlite:///{store}")
