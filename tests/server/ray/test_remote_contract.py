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


def test_a_local_ray_instance_starts_without_the_dashboard(monkeypatch):
    # bench/replicas.py on 2 cores: the dashboard's processes cost ~8% of the throughput.
    import ray

    from server.ray import deploy
    from server.settings import Settings

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(RuntimeError, match="stop here"):
        deploy.serve_on_ray(Settings(), deploy.Scaling())
    assert calls[0]["include_dashboard"] is False


def test_an_ingress_copy_takes_more_than_rays_default_five_requests_at_once():
    # Regression: with Ray's default max_ongoing_requests (5), the 6th concurrent client of an
    # ingress copy, a WebSocket follower too, waited in Ray's proxy (bench/replicas.py: 8
    # clients, p50 time to first frame 2.5 s against 0.55 s for one plain process).
    from server.ray import deploy
    from server.settings import Settings

    options = deploy.ingress_options(Settings(), deploy.Scaling(max_replicas=2))
    assert options["max_ongoing_requests"] >= 1000
