"""Probes, metrics, the model description, the docs, the page; settings and the ddpm-serve command."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server import cli
from tests.server.api.conftest import serve_fake
from server.settings import PROJECT_ROOT, Settings


def samples(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_metrics_count_engine_events_and_http_requests_by_route_template(client):
    client.post("/generate", json={"n": 2, "steps": 3})
    client.get("/jobs/unknown-id")
    client.post("/generate", json={"n": 0})
    metrics = samples(client)
    assert metrics[("ddpm_images_submitted_total", ())] == 2
    assert metrics[("ddpm_requests_finished_total", (("outcome", "succeeded"),))] == 1
    assert metrics[("ddpm_batch_size_count", ())] == 3
    assert metrics[("ddpm_step_seconds_count", ())] == 3
    assert metrics[("ddpm_queue_wait_seconds_count", ())] == 1
    assert metrics[("ddpm_requests_rejected_total", (("reason", "invalid"),))] == 1
    assert metrics[("process_resident_memory_bytes", ())] > 0 and ("ddpm_websockets_open", ()) in metrics
    http = "ddpm_http_requests_total"
    assert metrics[(http, (("method", "POST"), ("route", "/generate"), ("status", "200")))] == 1
    assert metrics[(http, (("method", "POST"), ("route", "/generate"), ("status", "422")))] == 1
    assert metrics[(http, (("method", "GET"), ("route", "/jobs/{job_id}"), ("status", "404")))] == 1


def test_metrics_count_rejections(served):
    client, engine = served
    engine.closing = True
    client.post("/generate", json={"steps": 1})
    assert samples(client)[("ddpm_requests_rejected_total", (("reason", "closed"),))] == 1


def test_each_app_has_its_own_registry():
    from tests.server.api.conftest import serve_fake

    with serve_fake() as (first, _), serve_fake() as (second, _):
        first.post("/generate", json={"steps": 1})
        assert samples(first)[("ddpm_images_submitted_total", ())] == 1
        assert samples(second)[("ddpm_images_submitted_total", ())] == 0


def test_models_describes_the_served_model_and_limits(client):
    body = client.get("/models").json()
    assert body["num_timesteps"] == 50 and body["samplers"] == ["ddim", "ddpm"]
    assert body["limits"]["max_images_per_request"] == 16 and body["limits"]["max_steps"] == 50
    assert body["defaults"]["steps"] == 50 and body["auth_required"] is False
    assert body["defaults"]["steps_by_sampler"] == {"ddpm": 50, "ddim": 50, "dpmpp_2m": 20, "dpmpp_2m_sde": 50,
                                                    "unipc": 20}


def test_openapi_documents_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/generate", "/jobs", "/jobs/{job_id}", "/healthz", "/readyz", "/metrics", "/models"} <= set(paths)


def test_openapi_states_the_models_limits_with_exact_integers_and_no_security_without_keys():
    with serve_fake(max_images_per_request=4) as (client, _):
        text = client.get("/openapi.json").text
        schema = client.get("/openapi.json").json()
    for name in ("GenerateRequest", "JobRequest"):
        body = schema["components"]["schemas"][name]["properties"]
        assert (body["n"]["minimum"], body["n"]["maximum"], body["steps"]["maximum"]) == (1, 4, 50)
        assert body["seed"]["maximum"] == 2**63 - 1
    assert "9.223372036854776e+18" not in text
    assert "securitySchemes" not in schema["components"]
    assert all("security" not in op and "401" not in op["responses"]
               for ops in schema["paths"].values() for op in ops.values())


@pytest.mark.parametrize("auth", [False, True])
def test_docs_are_public_and_load_nothing_from_outside(auth):
    with serve_fake(api_keys="some-key-0123456789" if auth else "") as (client, _):
        for page in ("/docs", "/redoc"):
            html = client.get(page)
            assert html.status_code == 200 and "https://" not in html.text
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
        assert client.get("/docs-assets/redoc.standalone.js").status_code == 200
        schema = client.get("/openapi.json").json()
    assert ("HTTPBearer" in schema["components"].get("securitySchemes", {})) == auth


def test_index_page_is_served(client):
    response = client.get("/")
    assert response.headers["content-type"].startswith("text/html")
    assert "/ws/generate" in response.text


def test_settings_read_env_and_split_comma_lists(monkeypatch):
    monkeypatch.setenv("DDPM_API_KEYS", " a1 , b2,,")
    monkeypatch.setenv("DDPM_MAX_BATCH", "8")
    settings = Settings()
    assert settings.api_keys == ["a1", "b2"] and settings.max_batch == 8 and settings.auth_enabled


def test_relative_weights_resolve_from_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Settings(weights="weights/x.safetensors").weights == PROJECT_ROOT / "weights" / "x.safetensors"
    assert Settings().weights == PROJECT_ROOT / "weights" / "ddpm-mnist.safetensors"


def test_flags_override_env(monkeypatch):
    monkeypatch.setenv("DDPM_PORT", "9000")
    monkeypatch.setenv("DDPM_MAX_QUEUE", "70")
    settings = cli.settings_from(["--port", "9100", "--policy", "static"])
    assert (settings.port, settings.max_queue, settings.policy) == (9100, 70, "static")


@pytest.mark.parametrize(
    "make_weights, message",
    [
        (lambda path: None, "weights not found"),
        (lambda path: path.write_bytes(b"\x00" * 100), "cannot load weights"),
        (lambda path: path.mkdir(), "cannot load weights"),
    ],
)
def test_unloadable_weights_end_startup_with_one_line(tmp_path, capsys, make_weights, message):
    path = tmp_path / "model.safetensors"
    make_weights(path)
    assert cli.main(["--weights", str(path), "--port", "0", "--jobs-db", "memory://"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ddpm-serve: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device 'tpu'"),
    ("xla", "not supported"),
    pytest.param("cuda", "sees no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_device_problems_are_named_in_one_line(tiny_weights, capsys, device, message):
    assert cli.main(["--weights", str(tiny_weights), "--device", device, "--port", "0", "--jobs-db", "memory://"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ddpm-serve: error: ") and message in err and err.count("\n") == 1


def test_a_busy_port_fails_before_the_weights_load(tiny_weights, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(cli, "load_model", loaded.append)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["--weights", str(tiny_weights), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err == f"ddpm-serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert not loaded


@pytest.mark.parametrize(
    "flags, message",
    [(["--max-batch", "0"], "max_batch"), (["--max-queue", "4", "--max-images-per-request", "8"], "max_queue")],
)
def test_invalid_option_values_exit_2(capsys, flags, message):
    assert cli.main([*flags, "--weights", "x"]) == 2
    assert message in capsys.readouterr().err


def test_make_serve_passes_args_to_ddpm_serve():
    result = subprocess.run(["make", "--no-print-directory", "-n", "serve", "ARGS=--port 9000 --max-batch 8"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert ".venv/bin/ddpm-serve --port 9000 --max-batch 8" in result.stdout.splitlines()


def test_a_corrupt_job_store_ends_startup_with_one_line(tiny_weights, tmp_path, capsys):
    corrupt = tmp_path / "jobs.db"
    corrupt.write_bytes(b"not a database" * 100)
    assert cli.main(["--weights", str(tiny_weights), "--port", "0", "--jobs-db", f"sqlite:///{corrupt}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ddpm-serve: error: cannot open the job store") and err.count("\n") == 1


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_ddpm_serve_lets_idle_openmp_threads_sleep_unless_told_otherwise(monkeypatch, tiny_weights, preset, expected):
    """Spinning threads beside a busy process served 0.6x of one thread's images/s (README)."""
    if preset is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    seen = []

    def load_model(settings):
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
        raise cli.StartupError("stop here")

    monkeypatch.setattr(cli, "load_model", load_model)
    assert cli.main(["--weights", str(tiny_weights), "--port", "0", "--jobs-db", "memory://"]) == 1
    assert seen == [expected]
