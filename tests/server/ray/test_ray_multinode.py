"""ddpm-serve on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head
node and a second node with its own raylet), one engine replica on each.

Each node offers 1 CPU and a replica asks for 1 (its torch thread), so the two replicas can only
land on different nodes. The cluster is this module's own, stopped even when a test or its
start fails; it never overlaps test_ray_serve's (pytest ends one module's fixtures before the
next module's start).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'ddpm-serve[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'ddpm-serve[ray]'")
from ray.cluster_utils import Cluster  # noqa: E402

from server.ray.deploy import Scaling  # noqa: E402
from tests.server.ray.test_ray_serve import (  # noqa: E402
    assert_images_are_the_models,
    deploy,
    free_port,
    generate,
    replicas,
    replicas_named,
    run_job,
    stream,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

NODE = {"num_cpus": 1, "object_store_memory": 100 * 1024**2}  # one replica per node; a small object store
STEPS = 10


@pytest.fixture(scope="module")
def url(settings):
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        cluster.add_node(**NODE)
        ray.init(address=cluster.address, log_to_driver=False, namespace="ddpm-tests")
        cluster.wait_for_nodes()
        port = free_port()
        # One HTTP proxy, on the head: the nodes share this machine's ports.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        deploy(settings, Scaling(min_replicas=2, max_replicas=2))
        wait_for(lambda: len(replicas(url)) == 2, 120, "both replicas on the board")
        yield url
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_a_replica_on_each_node_and_both_serve_the_models_images(url, tiny_ddpm):
    placed = replicas(url)
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2 and {replica["node"] for replica in placed} == nodes  # one replica per node
    ids = {replica["id"] for replica in placed}
    with ThreadPoolExecutor(8) as pool:
        rest = [pool.submit(generate, url, n=2, steps=STEPS, seed=seed) for seed in range(6)]
        websocket = pool.submit(stream, url, n=1, steps=STEPS, seed=40)
        job = pool.submit(run_job, url, n=2, steps=STEPS, seed=41)
        openai = pool.submit(httpx.post, f"{url}/v1/images/generations", json={"steps": STEPS, "seed": 42}, timeout=120)
        responses = [future.result() for future in rest]
        events, job, openai = websocket.result(), job.result(), openai.result()
    for response in responses:
        assert_images_are_the_models(tiny_ddpm, response.json(), STEPS, "ddpm")
    assert {response.headers["x-ddpm-replica"] for response in responses} == ids  # both nodes' replicas served
    assert events[-1]["type"] == "done" and set(replicas_named(events)) <= ids
    assert_images_are_the_models(tiny_ddpm, events[-1], STEPS, "ddpm")
    assert job["status"] == "succeeded" and job["accepted_by"] in ids  # read back through GET /jobs/{id}
    assert_images_are_the_models(tiny_ddpm, job["result"], STEPS, "ddpm")
    assert openai.status_code == 200 and openai.headers["x-ddpm-replica"] in ids
    assert_images_are_the_models(tiny_ddpm, openai.json(), STEPS, "ddpm")
    served = wait_for(lambda: all(r["served"] for r in replicas(url)) and replicas(url), 10, "the board's counts")
    assert sum(replica["served"] for replica in served) == 9
