"""--download against a local HTTP server on 127.0.0.1 (never the internet): tiny files in the
official formats (gzipped IDX for MNIST, the python-pickle tar for CIFAR-10) made here, their md5s
given through DDPM_DATA_CHECKSUMS; without them the official md5s apply and the download fails."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data import load_dataset
from model.download import DownloadError, fetch
from model.evaluate import evaluate
from model.train import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Path:
    """A folder served over HTTP on 127.0.0.1, set as DDPM_DATA_MIRROR."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DDPM_DATA_MIRROR", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    yield root
    server.shutdown()
    server.server_close()


def vouch_for(mirror: Path, monkeypatch) -> None:
    """DDPM_DATA_CHECKSUMS: the md5s of the files the mirror serves, in md5sum's format."""
    sums = mirror.parent / "MD5SUMS"
    sums.write_text("".join(f"{hashlib.md5(f.read_bytes()).hexdigest()}  {f.name}\n" for f in sorted(mirror.iterdir())))
    monkeypatch.setenv("DDPM_DATA_CHECKSUMS", str(sums))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def serve_mnist(mirror: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), "y_train": rng.integers(0, 10, 20, dtype=np.uint8),
              "x_test": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), "y_test": rng.integers(0, 10, 6, dtype=np.uint8)}
    for key, name in [("x_train", "train-images-idx3-ubyte.gz"), ("y_train", "train-labels-idx1-ubyte.gz"),
                      ("x_test", "t10k-images-idx3-ubyte.gz"), ("y_test", "t10k-labels-idx1-ubyte.gz")]:
        write_idx(mirror / name, arrays[key])
    return arrays


def add_to_tar(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def serve_cifar10(mirror: Path) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-python.tar.gz as Krizhevsky ships it: pickled dicts with bytes keys, each data row
    the R, G and B planes of one 32x32 image. Returns the (N, 32, 32, 3) train and test images."""
    rng = np.random.default_rng(1)
    images = {"train": rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
              "test": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)}
    batches = {f"data_batch_{i + 1}": images["train"][2 * i : 2 * i + 2] for i in range(5)}
    batches["test_batch"] = images["test"]
    with tarfile.open(mirror / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, batch in batches.items():
            rows = batch.transpose(0, 3, 1, 2).reshape(len(batch), -1)
            record = {b"batch_label": name.encode(), b"labels": [3] * len(batch), b"data": rows}
            add_to_tar(tar, f"cifar-10-batches-py/{name}", pickle.dumps(record, protocol=2))
        add_to_tar(tar, "cifar-10-batches-py/batches.meta", pickle.dumps({b"num_cases_per_batch": 2}, protocol=2))
    return images["train"], images["test"]


def test_mnist_download_trains_evaluates_and_is_cached(tmp_path, mirror, monkeypatch, tiny_weights):
    arrays = serve_mnist(mirror)
    vouch_for(mirror, monkeypatch)
    data_dir = tmp_path / "data"
    main(["--preset", "tiny", "--data", "mnist", "--download", "--data-dir", str(data_dir), "--out", str(tmp_path / "run"),
          "--steps", "1", "--batch-size", "4", "--device", "cpu", "--sample-every", "0"])
    assert (tmp_path / "run" / "model.safetensors").is_file()
    with np.load(data_dir / "mnist.npz") as saved:
        assert set(saved) == set(arrays)
        for key, array in arrays.items():
            np.testing.assert_array_equal(saved[key], array)
    assert sorted(p.name for p in data_dir.iterdir()) == ["mnist.npz"]  # no partial downloads left

    # The cached file is used as it is: no server needed any more.
    monkeypatch.setenv("DDPM_DATA_MIRROR", "http://127.0.0.1:9/")
    result = evaluate(["nll", "--weights", str(tiny_weights), "--device", "cpu", "--data", "mnist", "--download",
                       "--data-dir", str(data_dir), "--limit", "2"])
    assert result["num_images"] == 2


def test_cifar10_download_converts_the_python_batches(tmp_path, mirror, monkeypatch):
    train, test = serve_cifar10(mirror)
    vouch_for(mirror, monkeypatch)
    path = fetch("cifar10", tmp_path / "data")
    assert path == tmp_path / "data" / "cifar10.npz"
    loaded = load_dataset("cifar10", "train", str(path), image_size=32, channels=3)
    assert torch.equal(loaded, torch.from_numpy(train).permute(0, 3, 1, 2))
    assert torch.equal(load_dataset("cifar10", "test", str(path), 32, 3, limit=2), torch.from_numpy(test[:2]).permute(0, 3, 1, 2))
    with np.load(path) as saved:
        assert saved["y_train"].tolist() == [3] * 10 and saved["x_test"].shape == (3, 32, 32, 3)


def test_a_pickle_that_would_run_code_is_refused(tmp_path, mirror, monkeypatch):
    with tarfile.open(mirror / "cifar-10-python.tar.gz", "w:gz") as tar:
        add_to_tar(tar, "cifar-10-batches-py/data_batch_1", pickle.dumps(os.system, protocol=2))
    vouch_for(mirror, monkeypatch)
    with pytest.raises(DownloadError, match="refused to load"):
        fetch("cifar10", tmp_path / "data")
    assert not (tmp_path / "data" / "cifar10.npz").exists()


def run_train_cli(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "model.train", "--preset", "tiny", "--data", "mnist", "--download",
         "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=300)


def test_failed_downloads_are_one_line_and_exit_1(tmp_path, mirror):
    serve_mnist(mirror)  # not the official files, and no DDPM_DATA_CHECKSUMS: the official md5s fail
    mirror_url = os.environ["DDPM_DATA_MIRROR"]
    wrong_sum = run_train_cli(tmp_path, {})
    assert wrong_sum.returncode == 1
    assert wrong_sum.stderr.count("\n") == 1, wrong_sum.stderr
    assert wrong_sum.stderr.startswith(f"ddpm-train: download of {mirror_url}train-images-idx3-ubyte.gz: md5 ")
    assert "expected f68b3c2dcbeaaa9fbdd348bbdeb94873" in wrong_sum.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())

    (mirror / "train-images-idx3-ubyte.gz").unlink()
    missing = run_train_cli(tmp_path, {})
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr == f"ddpm-train: download of {mirror_url}train-images-idx3-ubyte.gz failed: HTTP 404 File not found\n"


def test_unreachable_source_and_bad_combinations_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_DATA_MIRROR", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(DownloadError, match=r"^download of http://127.0.0.1:9/train-images-idx3-ubyte.gz failed: "):
        fetch("mnist", tmp_path / "data")
    base = ["--preset", "tiny", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "run"), "--download"]
    with pytest.raises(SystemExit, match="pass either --download .* or --data-path"):
        main([*base, "--data", "mnist", "--data-path", str(tmp_path / "mnist.npz")])
    with pytest.raises(SystemExit, match="--download fetches mnist or cifar10, not '.*folder'"):
        main([*base, "--data", str(tmp_path / "folder")])
