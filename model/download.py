"""--download: fetch MNIST or CIFAR-10 from their official sources into a cache folder, as the
npz files model.data reads (DATA_DIR/mnist.npz, DATA_DIR/cifar10.npz).

    MNIST     https://ossci-datasets.s3.amazonaws.com/mnist/ (the copy torchvision uses of
              http://yann.lecun.com/exdb/mnist/): the four IDX files, train/t10k images/labels
    CIFAR-10  https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (the python version)

Every downloaded file is checked against the md5 torchvision lists for it before it is read.
DDPM_DATA_MIRROR=URL fetches the same file names from another base URL (a mirror, a local
server); a mirror must serve the official files, since the official md5s still apply.
DDPM_DATA_CHECKSUMS=FILE replaces them with the md5s in FILE (`md5sum` format: "<md5>  <name>"
per line), for files that differ on purpose (tests, a re-packed copy): whoever sets it vouches
for those files. The npz is written to a temporary file and renamed, so a cache file is
either whole or absent; an existing one is used as it is.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import hashlib
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

try:  # numpy 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

from .data import DatasetError

MIRROR_ENV = "DDPM_DATA_MIRROR"
CHECKSUMS_ENV = "DDPM_DATA_CHECKSUMS"
DEFAULT_DOWNLOAD_DIR = "data"


class DownloadError(DatasetError):
    """A download that failed or a file that is not what was expected; one line, with the URL."""


@dataclass(frozen=True)
class Source:
    base_url: str
    md5: dict[str, str]  # file name -> md5 of the official file (as torchvision lists them)
    cache_name: str  # the npz written into the download folder


SOURCES = {
    "mnist": Source(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "mnist.npz",
    ),
    "cifar10": Source(
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        "cifar10.npz",
    ),
}


def add_data_arguments(parser: argparse.ArgumentParser, data_default: str) -> None:
    """--data, --data-path, --download and --data-dir, as ddpm-train and ddpm-eval take them."""
    parser.add_argument("--data", default=None,
                        help=f"'mnist', 'cifar10' or a folder of images (default: {data_default})")
    parser.add_argument("--data-path", default=None,
                        help="file of the mnist/cifar10 dataset (default: ../shared/data, or $DDPM_DATA_DIR)")
    parser.add_argument("--download", action="store_true",
                        help="fetch mnist/cifar10 from the official source into --data-dir when absent "
                             f"(${MIRROR_ENV}: another base URL)")
    parser.add_argument("--data-dir", default=DEFAULT_DOWNLOAD_DIR,
                        help=f"where --download keeps mnist.npz / cifar10.npz (default: ./{DEFAULT_DOWNLOAD_DIR})")


def resolve_data_path(args: argparse.Namespace, data: str) -> str | None:
    """The --data-path to load `data` from: with --download, the file in --data-dir, fetched when absent."""
    if not args.download:
        return args.data_path
    if args.data_path:
        raise DatasetError("pass either --download (into --data-dir) or --data-path, not both")
    if data not in SOURCES:
        raise DatasetError(f"--download fetches {' or '.join(SOURCES)}, not {data!r}")
    return str(fetch(data, args.data_dir))


def fetch(name: str, data_dir: str | os.PathLike) -> Path:
    """DATA_DIR/<name>.npz: as it is when present, else downloaded, checked and converted."""
    source = SOURCES[name]
    target = Path(data_dir) / source.cache_name
    if target.is_file():
        return target
    base = os.environ.get(MIRROR_ENV) or source.base_url
    expected = {**source.md5, **read_checksums(os.environ.get(CHECKSUMS_ENV))}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            files = {}
            for file_name in source.md5:
                files[file_name] = Path(tmp) / file_name
                download(base.rstrip("/") + "/" + file_name, files[file_name], expected[file_name])
            arrays = CONVERTERS[name](files)
            partial = Path(tmp) / source.cache_name
            np.savez_compressed(partial, **arrays)
            os.replace(partial, target)
    except OSError as exc:  # the folder: not writable, disk full
        raise DownloadError(f"cannot write {target}: {exc}") from exc
    print(f"{name}: wrote {target} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())})", file=sys.stderr)
    return target


def read_checksums(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DownloadError(f"{CHECKSUMS_ENV}={path}: unreadable: {exc}") from exc
    sums = {}
    for line in lines:
        if line.strip():
            md5, _, file_name = line.strip().partition(" ")
            sums[file_name.strip().lstrip("*")] = md5.lower()
    return sums


def download(url: str, path: Path, md5: str) -> None:
    """url -> path, with its md5 checked; any failure is a DownloadError naming the URL."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, path.open("wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, desc=path.name, unit="B", unit_scale=True, file=sys.stderr,
                      disable=not sys.stderr.isatty()) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"download of {url} failed: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        raise DownloadError(f"download of {url} failed: {exc}") from exc
    if digest.hexdigest() != md5:
        raise DownloadError(f"download of {url}: md5 {digest.hexdigest()}, expected {md5} "
                            f"(a broken download, or a mirror with other files; see {CHECKSUMS_ENV})")


# -- conversion to the npz layout of model.data -------------------------------------------
def read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000080N, N = dims), gzip-compressed."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = 4 + 4 * dims
    if len(raw) < header or raw[:4] != bytes([0, 0, 8, dims]):
        raise DownloadError(f"{path.name}: not an IDX file of {dims}-D unsigned bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) != header + int(np.prod(shape)):
        raise DownloadError(f"{path.name}: {len(raw) - header} bytes of data for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def convert_mnist(files: dict[str, Path]) -> dict[str, np.ndarray]:
    return {
        "x_train": read_idx(files["train-images-idx3-ubyte.gz"], 3),
        "y_train": read_idx(files["train-labels-idx1-ubyte.gz"], 1),
        "x_test": read_idx(files["t10k-images-idx3-ubyte.gz"], 3),
        "y_test": read_idx(files["t10k-labels-idx1-ubyte.gz"], 1),
    }


class BatchUnpickler(pickle.Unpickler):
    """Reads the CIFAR-10 batches (dicts of lists, bytes and uint8 arrays) and refuses any other
    class, so a bad file cannot run code."""

    def find_class(self, module: str, name: str):
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _reconstruct
        if (module, name) == ("_codecs", "encode"):  # bytes, as Python 3 writes them at protocol 2
            return codecs.encode
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def convert_cifar10(files: dict[str, Path]) -> dict[str, np.ndarray]:
    batches = {}
    try:
        with tarfile.open(files["cifar-10-python.tar.gz"]) as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and (base.startswith("data_batch_") or base == "test_batch"):
                    batches[base] = BatchUnpickler(tar.extractfile(member), encoding="bytes").load()
    except (tarfile.TarError, pickle.UnpicklingError, EOFError) as exc:
        raise DownloadError(f"cifar-10-python.tar.gz: unreadable: {exc}") from exc

    def split(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not names or any(b"data" not in batches[n] or b"labels" not in batches[n] for n in names):
            raise DownloadError(f"cifar-10-python.tar.gz: missing or malformed batches (found {sorted(batches)})")
        data = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DownloadError(f"cifar-10-python.tar.gz: data of shape {data.shape}, expected (N, 3072)")
        labels = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.uint8) for n in names])
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels  # rows are R, G, B planes

    x_train, y_train = split(sorted(n for n in batches if n.startswith("data_batch_")))
    x_test, y_test = split([n for n in batches if n == "test_batch"])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


CONVERTERS = {"mnist": convert_mnist, "cifar10": convert_cifar10}
