"""The 5,000-image MNIST subset shipped inside the package (``bnjax/assets/mnist_5k.npz``)."""

from __future__ import annotations

import hashlib
import io
from importlib import resources

import numpy as np

from bnjax.data.common import BUNDLED_SIZE, Dataset, _check_counts, _finish


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
