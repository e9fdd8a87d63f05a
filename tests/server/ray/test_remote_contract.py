"""The ingress's remote engine implements the same EngineClient as the local one (no cluster needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'ddpm-serve[ray]'")

from server.contract import EngineClient, NullObserver  # noqa: E402
from server.ray.remote import RemoteEngine  # noqa: E402
from tests.server.test_contract import assert_implements  # noqa: E402


def test_the_remote_engine_implements_the_engine_client():
    engine = RemoteEngine(None, None, NullObserver(), max_attempts=3, max_replicas=2, grace_s=1.0)
    assert_implements(RemoteEngine, EngineClient, engine)
