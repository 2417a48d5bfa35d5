"""Full MNIST from the four standard idx files: read, verified against their sha256, downloaded once into a
cache (atomically, every request bounded by a timeout)."""

from __future__ import annotations

import gzip
import http.client
import math
import os
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from bnjax.data.common import (
    _LABEL_FILES, _REPLACE, _TEST_IMAGES, _TEST_LABELS, _TRAIN_IMAGES, _TRAIN_LABELS, _USE_BUNDLED, _USE_DATA_DIR,
    MNIST_FILES, MNIST_RAW_FILES, MNIST_URL, ChecksumError, DataUnavailableError, Dataset, _finish, _sha256_file,
)
from bnjax.files import atomic_file


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or raw) of unsigned bytes: ``[N, 28, 28]`` images or ``[N]`` labels.

    Raises ``ValueError`` naming the file when it is not a well-formed unsigned-byte idx file (or not valid
    gzip), and ``DataUnavailableError`` when it cannot be read at all.

    Args:
      path: the file.

    Returns:
      The uint8 array.

    Raises:
      ValueError, DataUnavailableError: as above.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a valid gzip file ({err}); replace it with the original file") from err
    except OSError as err:
        raise DataUnavailableError(f"cannot read {path} ({err.strerror or err})") from err
    if path.suffix != ".gz" and data[:2] == b"\x1f\x8b":
        raise ValueError(f"{path}: is gzip-compressed; name it {path.name}.gz")
    if len(data) < 4:
        raise ValueError(f"{path}: not an idx file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()}, expected 000008xx)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: idx header truncated ({len(data)} bytes, {ndim}-d header needs {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(shape)
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _read_mnist_idx(path: Path, labels: bool) -> np.ndarray:
    """``read_idx`` plus MNIST's shapes: labels ``[N]`` in 0..9, images ``[N, 28, 28]``."""
    array = read_idx(path)
    if labels:
        if array.ndim != 1:
            raise ValueError(f"{path}: expected MNIST labels of shape [N], got {array.shape}{_REPLACE}")
        if array.size and int(array.max()) > 9:
            raise ValueError(f"{path}: label {int(array.max())} outside 0..9, not an MNIST label file{_REPLACE}")
    elif array.ndim != 3 or array.shape[1:] != (28, 28):
        raise ValueError(f"{path}: expected MNIST images of shape [N, 28, 28], got {array.shape}{_REPLACE}")
    return array


def default_cache_dir() -> Path:
    """``$BNJAX_DATA_DIR``, else ``$XDG_CACHE_HOME/bnjax/mnist``, else ``~/.cache/bnjax/mnist``.

    Returns:
      The folder (not created here).
    """
    if os.environ.get("BNJAX_DATA_DIR"):
        return Path(os.environ["BNJAX_DATA_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnjax" / "mnist"


def _verified(path: Path, sha256: str | None) -> bool:
    try:
        return path.is_file() and (sha256 is None or _sha256_file(path) == sha256)
    except OSError:  # unreadable: not usable as it is
        return False


def _hash_file(path: Path) -> str:
    try:
        return _sha256_file(path)
    except OSError as err:
        raise DataUnavailableError(f"cannot read {path} ({err.strerror or err})") from err


def _home_problem() -> str | None:
    """Why the default cache (under the home directory) cannot be used, or ``None``."""
    if os.environ.get("BNJAX_DATA_DIR") or os.environ.get("XDG_CACHE_HOME"):
        return None
    home = os.path.expanduser("~")
    if home.startswith("~"):
        return "no home directory is known (HOME is unset)"
    if not os.path.isdir(home):
        return f"the home directory {home} does not exist"
    return None


def _cache_error(cache: Path, reason: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"cannot use {cache} as the MNIST download cache: {reason}. Set BNJAX_DATA_DIR to a writable "
        f"directory, pass {_USE_DATA_DIR}, or use {_USE_BUNDLED}."
    )


def _os_reason(cache: Path, err: OSError) -> str:
    if cache.exists() and not cache.is_dir():
        return "it is not a directory"
    what = err.strerror or str(err)
    return f"{what} ({err.filename})" if err.filename and str(err.filename) != str(cache) else what


def _fetch(url: str, out, timeout: float) -> None:
    """Stream ``url`` into ``out``; network trouble -> ``DataUnavailableError``, write trouble -> ``OSError``."""

    def unreachable(err: BaseException) -> DataUnavailableError:
        return DataUnavailableError(
            f"could not download {url} within {timeout:g} s ({err}). Offline? Use {_USE_BUNDLED}, or pass "
            f"{_USE_DATA_DIR}."
        )

    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except (OSError, TimeoutError, http.client.HTTPException, ValueError) as err:  # URLError is an OSError
        raise unreachable(err) from err
    with resp:
        while True:
            try:
                chunk = resp.read(1 << 20)
            except (OSError, TimeoutError, http.client.HTTPException) as err:
                raise unreachable(err) from err
            if not chunk:
                return
            out.write(chunk)


def download_mnist(
    cache_dir: str | os.PathLike | None = None,
    *,
    base_url: str = MNIST_URL,
    checksums: dict[str, str] = MNIST_FILES,
    timeout: float = 10.0,
) -> dict[str, Path]:
    """Fetch the idx files into ``cache_dir`` once; return ``{name: path}``.

    Files already present with the right sha256 are kept. Each download goes to a temporary file in the
    same directory, is verified, then renamed into place, so an interrupted or corrupt download never leaves a
    file behind. Raises ``ChecksumError`` on a mismatch and ``DataUnavailableError`` when the server cannot be
    reached within ``timeout`` seconds or the cache directory cannot be created or written.

    Args:
      cache_dir: the folder (``None``: ``default_cache_dir()``).
      base_url: where the four files are.
      checksums: file name -> expected sha256.
      timeout: seconds per request.

    Returns:
      file name -> path of the verified file.

    Raises:
      ChecksumError, DataUnavailableError: as above.
    """
    if cache_dir is None:
        cache = default_cache_dir()
        problem = _home_problem()
        if problem:
            raise _cache_error(cache, problem)
    else:
        cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cache_error(cache, _os_reason(cache, err)) from err
    paths = {}
    for name, sha in checksums.items():
        path = cache / name
        if not _verified(path, sha):
            url = base_url.rstrip("/") + "/" + name
            try:
                with atomic_file(path, "wb") as out:
                    _fetch(url, out, timeout)
                    out.flush()
                    got = _sha256_file(Path(out.name))
                    if got != sha:
                        raise ChecksumError(
                            f"{url}: sha256 {got} does not match the expected {sha}; nothing was kept. Try again "
                            f"later, or use {_USE_BUNDLED}."
                        )
            except OSError as err:  # the temporary file, writing, renaming: not the network (see _fetch)
                raise _cache_error(cache, _os_reason(cache, err)) from err
        paths[name] = path
    return paths


def _check_standard(paths: dict[str, Path], hashes: dict[str, str], checksums: dict[str, str],
                    raw_checksums: dict[str, str]) -> None:
    """Refuse any file of a user's directory that is not the standard one, compressed or not.

    Run after the files were read, so that a malformed file gets the more specific message of ``read_idx``.
    """
    for name, p in paths.items():
        compressed = p.suffix == ".gz"
        expected = checksums[name] if compressed else raw_checksums.get(name.removesuffix(".gz"))
        if hashes[name] != expected:
            form = "" if compressed else " (uncompressed)"
            other = "its uncompressed form" if compressed else "its .gz form"
            raise ChecksumError(
                f"{p}: sha256 {hashes[name]} does not match the standard MNIST file{form}; replace it with the "
                f"original (or {other})"
            )


def _find_idx(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_idx(
    data_dir: str | os.PathLike | None = None,
    num_train: int = 1000,
    num_heldout: int | None = None,
    *,
    download: bool = True,
    base_url: str = MNIST_URL,
    checksums: dict[str, str] = MNIST_FILES,
    raw_checksums: dict[str, str] = MNIST_RAW_FILES,
    timeout: float = 10.0,
) -> Dataset:
    """Full MNIST from idx files: the first ``num_train`` training images (as the book) and the first
    ``num_heldout`` test images (default all).

    Args:
      data_dir: a directory holding the four files (``.gz`` or uncompressed); when given, nothing is
        downloaded and every file is checked: ``.gz`` files against ``checksums``, uncompressed ones against
        ``raw_checksums``. ``None``: the cache directory,
        downloaded into if needed (``download=True``). Every file, compressed or not, must be an idx file of
        MNIST's shape (images ``[N, 28, 28]``, labels ``[N]`` in 0..9, as many labels as images); the source
        record's ``files_sha256`` names the files actually read.
      base_url, checksums, timeout: where to download from, the expected sha256 per file, seconds per request.
      raw_checksums: uncompressed file name -> expected sha256 (default: the standard files decompressed).
      num_train: the first training images to keep.
      num_heldout: the first test images to keep (``None``: all 10,000).
      download: fetch missing files into the cache.

    Returns:
      A ``Dataset`` (see ``load``).

    Raises:
      DataUnavailableError: files missing and not downloadable, or unreadable.
      ChecksumError: a file (``.gz`` or uncompressed) is not the original.
      ValueError: impossible sizes or a malformed file.
    """
    if data_dir is not None:
        directory = Path(data_dir)
        if not directory.is_dir():
            raise DataUnavailableError(f"--data-dir (data_dir) {directory} is not a directory")
        paths = {}
        for name in checksums:
            p = _find_idx(directory, name)
            if p is None:
                raise DataUnavailableError(
                    f"{directory} has no {name} (nor {name.removesuffix('.gz')}): put the four MNIST idx files "
                    f"there, or use {_USE_BUNDLED}"
                )
            paths[name] = p
        hashes = {n: _hash_file(p) for n, p in paths.items()}  # checked below, after the structure; recorded
    else:
        cache = default_cache_dir()
        if download:
            paths = download_mnist(None, base_url=base_url, checksums=checksums, timeout=timeout)
            hashes = dict(checksums)  # download_mnist verified every file against these
        else:
            paths = {n: cache / n for n in checksums}
            hashes = {n: _hash_file(p) for n, p in paths.items() if p.is_file()}
            missing = [n for n, s in checksums.items() if hashes.get(n) != s]
            if missing:
                raise DataUnavailableError(
                    f"{cache} lacks verified {', '.join(missing)}: use --data mnist to download them "
                    f"(download=True), or pass {_USE_DATA_DIR}"
                )
    arrays = {n: _read_mnist_idx(paths[n], labels=n in _LABEL_FILES) for n in MNIST_FILES}
    for images, labels in ((_TRAIN_IMAGES, _TRAIN_LABELS), (_TEST_IMAGES, _TEST_LABELS)):
        if len(arrays[images]) != len(arrays[labels]):
            raise ValueError(
                f"{paths[images]} holds {len(arrays[images])} images but {paths[labels]} holds "
                f"{len(arrays[labels])} labels; replace them with the original MNIST files"
            )
    if data_dir is not None:  # downloaded and cached files were verified above
        _check_standard(paths, hashes, checksums, raw_checksums)
    train_images, train_labels = arrays[_TRAIN_IMAGES], arrays[_TRAIN_LABELS]
    test_images, test_labels = arrays[_TEST_IMAGES], arrays[_TEST_LABELS]
    if num_train < 1 or num_train > len(train_labels):
        raise ValueError(f"num_train={num_train} (--train-size) must be in [1, {len(train_labels)}]")
    num_heldout = len(test_labels) if num_heldout is None else num_heldout
    if not 0 <= num_heldout <= len(test_labels):
        raise ValueError(f"num_heldout={num_heldout} (--heldout-size) must be in [0, {len(test_labels)}]")
    source = {
        "name": "mnist",
        "description": "MNIST idx files: first num_train training images, first num_heldout test images",
        "license": "CC BY-SA 3.0 (Yann LeCun and Corinna Cortes)",
        # Keyed by the files actually read (``.gz`` or uncompressed).
        "files_sha256": {Path(paths[n]).name: hashes[n] for n in MNIST_FILES},
        "path": str(Path(paths[_TRAIN_IMAGES]).parent),
    }
    return _finish(
        train_images[:num_train], train_labels[:num_train],
        test_images[:num_heldout], test_labels[:num_heldout], source,
    )
