"""The Docker image and compose stack.

Static checks always run. `docker compose config` runs where a compose tool exists (the `ray`
profile's services too). The full build-and-serve smoke tests (docker/smoke-test.sh, and
docker/ray-smoke-test.sh for the `ray` profile: a Ray head and two worker containers; minutes
each) run only with DDPM_DOCKER_TESTS=1 and a Docker engine that answers; where no registry is
reachable, point BASE_IMAGE at a local base image (see /work/shared/docker/local-base.sh) and,
where download.pytorch.org is unreachable too, TORCH_INDEX_URL at https://pypi.org/simple (the
local base carries torch's CPU wheel).
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


def compose_config(*files: Path, profiles: tuple[str, ...] = ()) -> str:
    command = compose_command()
    if command is None:
        pytest.skip("no compose tool: neither `docker compose` nor `docker-compose` is installed")
    arguments = [part for path in files for part in ("-f", str(path))]
    arguments += [part for profile in profiles for part in ("--profile", profile)]
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


def mounts(service: dict) -> dict[str, str]:
    """{target: source} of a service's volumes, from either tool's `config` or the file itself."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        found[target] = source
    return found


def flag(arguments: str, name: str) -> str:
    """The value of `--name=value` or `--name value` in a command line."""
    match = re.search(rf"--{name}[= ](\S+)", arguments)
    assert match, f"--{name} is not in {arguments!r}"
    return match.group(1)


def size_in_bytes(text: str | int) -> int:
    match = re.fullmatch(r"(\d+)([kmg]?)b?", str(text).lower())
    assert match, text
    return int(match.group(1)) * 1024 ** " kmg".index(match.group(2) or " ")


def ray_services(text: str) -> tuple[dict, dict]:
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(text)["services"]
    assert {"ray-head", "ray-worker"} <= services.keys()
    return services["ray-head"], services["ray-worker"]


def test_ray_profile_config_is_valid():
    """`docker compose --profile ray config`: the head and the workers, from one image with Ray."""
    head, worker = ray_services(compose_config(COMPOSE_FILE, profiles=("ray",)))
    assert head["build"]["args"]["EXTRAS"] == "ray"
    # Both name the build, so neither tool tries to pull the image for the workers.
    assert worker["image"] == head["image"] and worker["build"] == head["build"]
    assert head["image"].endswith("-ray")
    assert head["ports"], "the head publishes no port"
    assert worker["deploy"]["replicas"] == 2
    # One job store for every node: the ingress may be placed on a worker.
    assert mounts(head)["/var/lib/ddpm"] == mounts(worker)["/var/lib/ddpm"]


def test_ray_profile_head_and_workers_agree():
    """The file itself: what the head starts must fit what the workers offer."""
    head, worker = ray_services(COMPOSE_FILE.read_text())
    head_command, worker_command = " ".join(head["command"]), " ".join(worker["entrypoint"])
    # The head runs no replica: the replicas (1 CPU each) land one on each 1-CPU worker.
    assert flag(head_command, "num-cpus") == "0"
    assert flag(worker_command, "num-cpus") == "1"
    assert "DDPM_TORCH_THREADS" not in head["environment"], "a replica would ask for more CPUs than a worker has"
    assert int(flag(head_command, "replicas")) == worker["deploy"]["replicas"]
    assert flag(worker_command, "address") == f"ray-head:{flag(head_command, 'port')}"
    # Ray's object store lives in /dev/shm: each node's must fit, or Ray falls back to /tmp.
    for service, command in ((head, head_command), (worker, worker_command)):
        assert int(flag(command, "object-store-memory")) < size_in_bytes(service["shm_size"])
    # The CPU torch build, as for the server: an empty index meant PyPI's multi-GB CUDA torch.
    assert compose_default(head["build"]["args"]["TORCH_INDEX_URL"]) == CPU_INDEX
    assert head["environment"]["DDPM_JOBS_DB"].startswith("sqlite:////var/lib/ddpm/")
    assert mounts(head)["/var/lib/ddpm"] == mounts(worker)["/var/lib/ddpm"]
    # The head's ddpm-serve takes the same DDPM_* settings as the server service.
    assert "DDPM_API_KEYS" in head["environment"] and "DDPM_MAX_BATCH" in head["environment"]
    # The head stops first (reverse start order): its replicas finish on live workers.
    assert "ray-worker" in head["depends_on"]


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


def run_smoke_script(name: str, port_variable: str, what: str) -> None:
    """Run docker/NAME.sh on a free port; skipped without DDPM_DOCKER_TESTS=1 or a Docker engine."""
    if os.environ.get("DDPM_DOCKER_TESTS") != "1":
        pytest.skip(f"builds and runs {what} for minutes: set DDPM_DOCKER_TESTS=1 to run it")
    if not docker_engine_answers():
        pytest.skip("no Docker engine answers `docker info`")
    env = {**os.environ, port_variable: str(free_port())}
    result = subprocess.run([str(ROOT / "docker" / f"{name}.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1700)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-6000:]}"
    assert f"{name}: OK" in result.stdout


@pytest.mark.timeout(1800)
def test_smoke_build_and_serve():
    run_smoke_script("smoke-test", "SMOKE_PORT", "the image")


@pytest.mark.timeout(1800)
def test_ray_smoke_build_and_serve():
    """docker/ray-smoke-test.sh: the `ray` profile, a Ray head and two worker containers, for real."""
    run_smoke_script("ray-smoke-test", "RAY_SMOKE_PORT", "the ray profile")
