"""What every MNIST source shares: the ``Dataset`` record, the errors, the standard files' names and checksums
(compressed and uncompressed), and the step that turns uint8 images into a ``Dataset`` with its provenance."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

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
# sha256 of the same four files decompressed (what ``gunzip`` leaves), keyed by their uncompressed names: a
# ``--data-dir`` may hold either form, and both are checked. Confirmed on a copy of the uncompressed files whose
# label counts are MNIST's (train 5923, 6742, ...; test 980, 1135, ...) and which hold all 5,000 images of the
# bundled subset (``bnjax/assets/mnist_5k.npz``, from another source) with the same labels.
MNIST_RAW_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
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
