"""bnjax.data's tensorflow-datasets source: the adapter under tfds's mock data, failing at once (and quietly)
without prepared data or TensorFlow, and the timeout around it."""

import os

import numpy as np
import pytest

from bnjax import data
from helpers import run_cli


def test_tfds_adapter_under_mock_data(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data replaces the data, not the builder's on-disk state: skip the "is it prepared?" check here.
    monkeypatch.setattr(data.tfds, "_tfds_precheck", lambda *args: None)
    with tfds.testing.mock_data(num_examples=40):
        ds = data.load_tfds(num_train=25, num_heldout=7, timeout=60)
    assert ds.x_train.shape == (25, 784) and ds.x_train.dtype == np.float32
    assert ds.t_train.dtype == np.int32 and ds.t_heldout.shape == (7,)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.t_train)) <= set(range(10))
    assert ds.source["name"] == "tfds" and ds.source["num_train"] == 25


def test_tfds_without_prepared_data_or_tensorflow_fails_at_once(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    import importlib.util
    import time

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: tfds could prepare MNIST (needs the network)")
    start = time.perf_counter()
    with pytest.raises(data.DataUnavailableError, match="needs TensorFlow"):
        data.load_tfds(10, 0, data_dir=tmp_path)
    assert time.perf_counter() - start < 10  # no retrying on an absent network


def _tfds_without_tensorflow():
    pytest.importorskip("tensorflow_datasets")
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: tfds could prepare MNIST (needs the network)")


def test_tfds_failure_logs_no_warning_and_restores_logging(tmp_path, caplog, monkeypatch):
    """tfds warns ("Variant folder ... has no dataset_info.json") before our one-line error: hidden (item 15)."""
    import logging

    _tfds_without_tensorflow()
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    absl = logging.getLogger("absl")
    monkeypatch.setattr(absl, "level", logging.NOTSET)
    caplog.set_level(logging.DEBUG)  # every record that reaches the root logger is seen
    with pytest.raises(data.DataUnavailableError, match="needs TensorFlow"):
        data.load_tfds(10, 0, data_dir=tmp_path)
    noise = [r for r in caplog.records if r.name.split(".")[0] in ("absl", "tensorflow", "tensorflow_datasets")]
    assert not noise, [r.getMessage() for r in noise]
    # Nothing is left changed: the loggers' levels and the environment are the user's again.
    assert absl.level == logging.NOTSET and "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    with data.tfds._quiet_tfds():
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2" and absl.getEffectiveLevel() == logging.ERROR
        absl.error("errors still show")
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == ["errors still show"]
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # a user's own setting is kept
    with data.tfds._quiet_tfds():
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


@pytest.mark.slow  # a command in a fresh process (imports jax)
def test_cli_tfds_failure_is_exactly_one_line(tmp_path):
    _tfds_without_tensorflow()
    (tmp_path / "tfds").mkdir()
    proc = run_cli("experiments.sweep", "--data", "tfds", "--data-dir", str(tmp_path / "tfds"), "--scales", "0.1",
                   "--epochs", "1", "--no-plot", "--no-cache", "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: could not load data (tfds):") and "--data bundled" in lines[0]


def test_timeout_wrapper_gives_up():
    import time

    with pytest.raises(data.DataUnavailableError, match="did not finish within"):
        data.tfds._with_timeout(lambda: time.sleep(5), 0.2, "slow thing")
    assert data.tfds._with_timeout(lambda: 3, 1.0, "fast thing") == 3
