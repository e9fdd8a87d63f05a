"""API tests run the real app (routes, middleware, lifespan) around a FakeEngine."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.server.api.fake_engine import FakeEngine

API_KEYS = ("key-alice-0123456789", "key-bob-9876543210")


@contextmanager
def serve_fake(engine_kwargs: dict | None = None, repository=None, **settings) -> Iterator[tuple[TestClient, FakeEngine]]:
    """A TestClient on a fresh app whose engine is a FakeEngine (yielded too, once started)."""
    engines: list[FakeEngine] = []

    def factory(settings, observer):
        engines.append(FakeEngine(observer, max_images_per_request=settings.max_images_per_request,
                                  **(engine_kwargs or {})))
        return engines[0]

    settings = {"jobs_db": "memory://", **settings}
    app = create_app(Settings(weights="unused.safetensors", **settings), engine_factory=factory, repository=repository)
    with TestClient(app) as client:
        yield client, engines[0]


@pytest.fixture
def client() -> Iterator[TestClient]:
    with serve_fake() as (client, _):
        yield client


@pytest.fixture
def served() -> Iterator[tuple[TestClient, FakeEngine]]:
    with serve_fake() as pair:
        yield pair


@pytest.fixture
def slow_served() -> Iterator[tuple[TestClient, FakeEngine]]:
    """Steps 20 ms apart: long enough to cancel or poll mid-run."""
    with serve_fake({"step_s": 0.02}) as pair:
        yield pair


@pytest.fixture
def auth_client() -> Iterator[TestClient]:
    with serve_fake(api_keys=",".join(API_KEYS), max_concurrent_per_key=2) as (client, _):
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
