"""bnjax.data offline: the bundled subset, idx files over a local HTTP server, tfds under mock_data."""

import functools
import gzip
import hashlib
import http.server
import struct
import threading

import numpy as np
import pytest

from bnjax import data

# From the data README: RandomState(0).permutation(5000)[:1000] holds these many of digits 0..9.
REFERENCE_COUNTS = [99, 106, 102, 92, 82, 117, 89, 107, 105, 101]


def test_bundled_shapes_dtypes_ranges_and_known_class_counts():
    ds = data.load_bundled()
    assert ds.x_train.shape == (1000, 784) and ds.x_train.dtype == np.float32
    assert ds.t_train.shape == (1000,) and ds.t_train.dtype == np.int32
    assert ds.x_heldout.shape == (4000, 784)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.x_train.max() == 1.0
    assert np.bincount(ds.t_train, minlength=10).tolist() == REFERENCE_COUNTS
    # 500 of each digit in all: train + held-out partition the file.
    assert np.all(np.bincount(np.concatenate([ds.t_train, ds.t_heldout]), minlength=10) == 500)
    assert ds.source["name"] == "bundled" and ds.source["train_class_counts"] == REFERENCE_COUNTS
    assert len(ds.source["file_sha256"]) == 64


def test_bundled_is_deterministic_and_disjoint():
    a, b = data.load_bundled(300, 200, split_seed=4), data.load_bundled(300, 200, split_seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.source["train_sha256"] == b.source["train_sha256"]
    c = data.load_bundled(300, 200, split_seed=5)
    assert a.source["train_sha256"] != c.source["train_sha256"]
    train_rows = {r.tobytes() for r in (a.x_train * 255).astype(np.uint8)}
    held_rows = {r.tobytes() for r in (a.x_heldout * 255).astype(np.uint8)}
    assert len(train_rows & held_rows) <= 2  # MNIST has a few duplicate images, not shared rows
    with pytest.raises(ValueError, match="num_train"):
        data.load_bundled(6000)
    with pytest.raises(ValueError, match="num_heldout"):
        data.load_bundled(4500, 1000)


# --------------------------------------------------------------------------------------------------
# idx files over a local HTTP server
# --------------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 30),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 12),
    }
    served = tmp_path / "served"
    served.mkdir()
    checksums = {}
    for name, arr in arrays.items():
        blob = _idx_bytes(arr)
        (served / name).write_bytes(blob)
        checksums[name] = hashlib.sha256(blob).hexdigest()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_address[1]}/", "checksums": checksums, "arrays": arrays,
               "served": served, "requests": server}
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_idx_download_verify_cache_and_load(fake_mnist, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BNJAX_DATA_DIR", str(cache))
    ds = data.load_mnist_idx(num_train=20, num_heldout=5, base_url=fake_mnist["url"],
                             checksums=fake_mnist["checksums"], timeout=5)
    arrays = fake_mnist["arrays"]
    np.testing.assert_allclose(ds.x_train, arrays["train-images-idx3-ubyte.gz"][:20].reshape(20, 784) / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(ds.t_train, arrays["train-labels-idx1-ubyte.gz"][:20])
    np.testing.assert_array_equal(ds.t_heldout, arrays["t10k-labels-idx1-ubyte.gz"][:5])
    assert sorted(p.name for p in cache.iterdir()) == sorted(fake_mnist["checksums"])
    assert ds.source["files_sha256"] == fake_mnist["checksums"]
    # Second load: served files removed, the verified cache is used, nothing is fetched.
    for p in fake_mnist["served"].iterdir():
        p.unlink()
    again = data.load_mnist_idx(num_train=20, num_heldout=5, base_url=fake_mnist["url"],
                                checksums=fake_mnist["checksums"], timeout=5)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    # A user-named directory works without any network.
    named = data.load_mnist_idx(cache, num_train=3, checksums=fake_mnist["checksums"])
    assert named.x_train.shape == (3, 784) and named.x_heldout.shape == (12, 784)


def test_auto_uses_verified_cached_mnist_and_falls_back_when_corrupt(fake_mnist, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BNJAX_DATA_DIR", str(cache))
    monkeypatch.setattr(data, "MNIST_FILES", fake_mnist["checksums"])
    data.download_mnist(cache, base_url=fake_mnist["url"], checksums=fake_mnist["checksums"], timeout=5)
    ds = data.load("auto", 10, 4)
    assert ds.source["name"] == "mnist" and ds.source["files_sha256"] == fake_mnist["checksums"]
    np.testing.assert_array_equal(ds.t_train, fake_mnist["arrays"]["train-labels-idx1-ubyte.gz"][:10])
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"corrupt")
    assert data.load("auto", 10, 4).source["name"] == "bundled"
    with pytest.raises(data.DataUnavailableError, match="lacks verified"):
        data.load_mnist_idx(None, 10, 4, download=False, checksums=fake_mnist["checksums"])


def test_corrupt_download_raises_and_leaves_nothing(fake_mnist, tmp_path):
    cache = tmp_path / "cache"
    bad = dict(fake_mnist["checksums"])
    bad["train-labels-idx1-ubyte.gz"] = "0" * 64
    with pytest.raises(data.ChecksumError, match="does not match"):
        data.download_mnist(cache, base_url=fake_mnist["url"], checksums=bad, timeout=5)
    assert not (cache / "train-labels-idx1-ubyte.gz").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_unreachable_server_fails_fast_with_advice(tmp_path):
    # Port 9 on loopback (discard) has no HTTP server here: the connection is refused at once.
    with pytest.raises(data.DataUnavailableError, match="bundled"):
        data.download_mnist(tmp_path / "c", base_url="http://127.0.0.1:9/", timeout=2)
    assert not any((tmp_path / "c").iterdir())


def test_read_idx_rejects_truncated_file(tmp_path):
    blob = gzip.decompress(_idx_bytes(np.zeros((4, 28, 28))))[:-10]
    (tmp_path / "x").write_bytes(blob)
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(tmp_path / "x")


def test_auto_never_downloads_and_falls_back_to_bundled(tmp_path, monkeypatch):
    monkeypatch.setenv("BNJAX_DATA_DIR", str(tmp_path / "empty"))
    ds = data.load("auto", 100, 10)
    assert ds.source["name"] == "bundled"
    assert not (tmp_path / "empty").exists()
    # The split seed reaches the bundled fallback as it reaches the bundled source.
    for source in ("auto", "bundled"):
        split = data.load(source, 100, 10, split_seed=3)
        np.testing.assert_array_equal(split.t_train, data.load_bundled(100, 10, split_seed=3).t_train)
        assert split.source["split_seed"] == 3
        assert not np.array_equal(split.t_train, ds.t_train)
    with pytest.raises(ValueError, match="unknown data source"):
        data.load("imagenet")


# --------------------------------------------------------------------------------------------------
# tensorflow-datasets
# --------------------------------------------------------------------------------------------------


def test_tfds_adapter_under_mock_data(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data replaces the data, not the builder's on-disk state: skip the "is it prepared?" check here.
    monkeypatch.setattr(data, "_tfds_precheck", lambda *args: None)
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


def test_timeout_wrapper_gives_up():
    import time

    with pytest.raises(data.DataUnavailableError, match="did not finish within"):
        data._with_timeout(lambda: time.sleep(5), 0.2, "slow thing")
    assert data._with_timeout(lambda: 3, 1.0, "fast thing") == 3
