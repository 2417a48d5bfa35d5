"""MNIST through tensorflow-datasets (optional extra ``bnjax[tfds]``), bounded by a timeout because offline
tfds retries for minutes."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from typing import Any, Callable, Iterator

import numpy as np

from bnjax.data.common import _USE_BUNDLED, DataUnavailableError, Dataset, _finish


# Loggers through which tensorflow-datasets and TensorFlow warn (absl's Python logging uses the "absl" logger).
_NOISY_LOGGERS = ("absl", "tensorflow", "tensorflow_datasets")


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Hide tfds's and TensorFlow's warnings (errors still show) while tfds is imported and used.

    Offline or unprepared, tfds warns (e.g. "Variant folder ... has no dataset_info.json") before the one-line
    ``DataUnavailableError`` that says what to do: the warning adds nothing to it. The loggers' levels and
    ``TF_CPP_MIN_LOG_LEVEL`` (TensorFlow's C++ logging, read when TensorFlow loads) are restored afterwards.
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    tf_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if tf_level is None:  # the user's own setting wins
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.ERROR))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if tf_level is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)


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
    tfds's and TensorFlow's warnings are hidden meanwhile (errors are raised, with what to do instead).

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
    with _quiet_tfds():
        return _load_tfds(num_train, num_heldout, data_dir, name, timeout)


def _load_tfds(num_train: int, num_heldout: int | None, data_dir: Any, name: str, timeout: float) -> Dataset:
    """``load_tfds`` itself, run inside ``_quiet_tfds``."""
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
