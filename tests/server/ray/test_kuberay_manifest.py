"""deploy/kuberay/rayservice.yaml read as KubeRay would (no Kubernetes here to apply it): its
Serve application imports and builds from its args, its image is the Ray image the compose file
builds, and its pods outlive a replica's graceful shutdown."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'ddpm-serve[ray]'")

from server.ray import deploy  # noqa: E402
from server.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
MANIFEST = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())


def application() -> dict:
    serve_config = yaml.safe_load(MANIFEST["spec"]["serveConfigV2"])
    app, = serve_config["applications"]
    return app


def test_the_serve_application_builds_from_its_args():
    app = application()
    assert app["import_path"] == "server.ray.deploy:app_builder"
    built = deploy.app_builder(app["args"])  # the same DDPM_* settings it gets there
    assert type(built).__name__ == "Application"
    args = dict(app["args"])
    assert args.pop("gpus") is True
    deploy.Scaling(**args)  # every other arg is a Scaling field


def test_every_pod_runs_the_ray_image_that_compose_builds():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    ray_image = compose["services"]["ray-head"]["image"].replace("${DDPM_IMAGE_TAG:-latest}", "latest")
    cluster = MANIFEST["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {container["image"] for group in groups for container in group["template"]["spec"]["containers"]}
    assert images == {ray_image}


def test_worker_pods_outlive_a_replicas_graceful_shutdown():
    settings = Settings()
    for group in MANIFEST["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > settings.request_timeout_s + settings.shutdown_grace_s
