"""The Docker image and compose stack.

Static checks always run. `docker compose config` runs where a compose tool exists. The full
build-and-serve smoke test (docker/smoke-test.sh, minutes) runs only with DDPM_DOCKER_TESTS=1
and a Docker engine that answers; where no registry is reachable, point BASE_IMAGE at a local
base image (see /work/shared/docker/local-base.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker" / "compose.gpu.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The CUDA builds PyTorch publishes for each release (RELEASE.md's compatibility matrix): an index
# without the pinned release makes pip fail, or an unpinned spec quietly install an older torch.
CUDA_BUILDS = {"2.13.0": {"cu126", "cu130", "cu132"}}
# Container paths, not the server's host-side defaults.
IMAGE_SPECIFIC_SETTINGS = {"weights"}


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def docker_engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def compose_setting_defaults() -> dict[str, str]:
    """{setting: default} for every `DDPM_X: ${DDPM_X:-default}` line of docker-compose.yml."""
    pairs = re.findall(r"^\s+DDPM_(\w+): \$\{DDPM_\1:-([^}]*)\}\s*$", COMPOSE_FILE.read_text(), re.M)
    return {name.lower(): default for name, default in pairs}


def test_compose_defaults_are_the_servers_own(monkeypatch):
    defaults = compose_setting_defaults()
    assert {"device", "max_batch", "max_queue", "api_keys"} <= defaults.keys()
    for name in list(os.environ):
        if name.startswith("DDPM_"):
            monkeypatch.delenv(name)
    built_in = Settings()
    for name, value in defaults.items():
        assert name in Settings.model_fields, f"docker-compose.yml sets DDPM_{name.upper()}, which the server lacks"
        if name in IMAGE_SPECIFIC_SETTINGS:
            continue
        monkeypatch.setenv(f"DDPM_{name.upper()}", value)
        assert getattr(Settings(), name) == getattr(built_in, name), f"DDPM_{name.upper()} default differs"
        monkeypatch.delenv(f"DDPM_{name.upper()}")


def test_every_dockerfile_copy_source_is_in_the_build_context():
    # .dockerignore lists what goes in (everything else stays out: .venv, .git, runs/ ...).
    ignore_lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore_lines, ".dockerignore should exclude everything by default"
    allowed = {line[1:].rstrip("/") for line in ignore_lines if line.startswith("!")}
    copies = re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.M)
    sources = [source.rstrip("/") for line in copies for source in line.split()[:-1]]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert source in allowed, f"the Dockerfile copies {source}, which .dockerignore keeps out"


def test_prometheus_scrapes_the_server_service():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["server:8000"]
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "server" in compose["services"]
    assert compose["services"]["prometheus"]["profiles"] == ["monitoring"]


def compose_config(*files: Path) -> str:
    command = compose_command()
    if command is None:
        pytest.skip("no compose tool: neither `docker compose` nor `docker-compose` is installed")
    arguments = [part for path in files for part in ("-f", str(path))]
    result = subprocess.run([*command, *arguments, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_compose_file_is_valid_and_needs_no_gpu():
    config = compose_config(COMPOSE_FILE)
    assert "ddpm-mnist.safetensors" in config
    assert "nvidia" not in config


def test_gpu_override_reserves_an_nvidia_gpu():
    config = compose_config(COMPOSE_FILE, GPU_OVERRIDE)
    assert re.search(r"driver: nvidia", config)
    assert re.search(r"- gpu\b", config)


def compose_default(text: str) -> str:
    """The default of a `${VAR:-default}` value."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", text)
    assert match, f"{text!r} is not ${{VAR:-default}}"
    return match.group(1)


def dockerfile_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(.*)$", DOCKERFILE.read_text(), re.M)
    return value.strip('"')


def pinned_torch() -> str:
    spec = dockerfile_arg("TORCH_SPEC")
    assert spec.startswith("torch=="), spec
    return spec.removeprefix("torch==")


def test_every_torch_pin_is_the_same():
    yaml = pytest.importorskip("yaml")
    compose_args = yaml.safe_load(COMPOSE_FILE.read_text())["x-image"]["build"]["args"]
    makefile_pin = re.search(r"^TORCH \?= (.*)$", MAKEFILE.read_text(), re.M).group(1)
    assert compose_default(compose_args["TORCH_SPEC"]) == makefile_pin == f"torch=={pinned_torch()}"


def test_cpu_images_take_torchs_cpu_build():
    """PyPI's torch for Linux x86_64 is a CUDA build of several GB: CPU images name the CPU index."""
    yaml = pytest.importorskip("yaml")
    compose_args = yaml.safe_load(COMPOSE_FILE.read_text())["x-image"]["build"]["args"]
    assert dockerfile_arg("TORCH_INDEX_URL") == compose_default(compose_args["TORCH_INDEX_URL"]) == CPU_INDEX


def test_gpu_images_take_a_cuda_build_of_the_pinned_torch_and_a_tag_of_their_own():
    yaml = pytest.importorskip("yaml")
    gpu = yaml.safe_load(GPU_OVERRIDE.read_text())["x-gpu"]
    index = compose_default(gpu["build"]["args"]["TORCH_INDEX_URL"])
    assert index.rsplit("/", 1)[1] in CUDA_BUILDS[pinned_torch()], index
    assert gpu["image"].endswith("-cuda")


def test_the_gpu_override_serves_and_trains_on_cuda_so_a_missing_gpu_fails_loudly():
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(GPU_OVERRIDE.read_text())["services"]
    assert compose_default(services["server"]["environment"]["DDPM_DEVICE"]) == "cuda"
    assert services["train"]["entrypoint"][-2:] == ["--device", "cuda"]


@pytest.mark.parametrize("path", [DOCKERFILE, GPU_OVERRIDE, COMPOSE_FILE, MAKEFILE, ROOT / "README.md"],
                         ids=lambda path: path.name)
def test_every_torch_index_the_docs_name_has_the_pinned_torch(path):
    """A stale cu124 hint installed torch 2.6 (`torch --index-url ...`) or failed to build."""
    text = path.read_text()
    for build in re.findall(r"download\.pytorch\.org/whl/(cu\d+)", text):
        assert build in CUDA_BUILDS[pinned_torch()], f"{path.name} names {build}, which has no torch {pinned_torch()}"
    assert not re.search(r"\btorch --index-url", text), f"{path.name} installs torch from an index without a version"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(1800)
def test_smoke_build_and_serve():
    if os.environ.get("DDPM_DOCKER_TESTS") != "1":
        pytest.skip("builds and runs the image for minutes: set DDPM_DOCKER_TESTS=1 to run it")
    if not docker_engine_answers():
        pytest.skip("no Docker engine answers `docker info`")
    env = {**os.environ, "SMOKE_PORT": str(free_port())}
    result = subprocess.run([str(ROOT / "docker" / "smoke-test.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1700)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-6000:]}"
    assert "smoke-test: OK" in result.stdout
