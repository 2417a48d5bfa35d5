"""bnjax.data offline: the bundled subset, idx files over a local HTTP server and in a directory (tfds:
test_data_tfds.py)."""

import functools
import os
import gzip
import hashlib
import http.server
import struct
import threading

import numpy as np
import pytest

from bnjax import data
from helpers import run_cli

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
    assert len(train_rows & held_rows) == 0  # all 5,000 bundled images are distinct: no row may be shared
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
# An unusable download cache: one DataUnavailableError naming the directory and what to do
# --------------------------------------------------------------------------------------------------

UNREACHABLE = "http://127.0.0.1:9/"  # nothing listens on loopback port 9: refused at once, never the network


def _assert_cache_advice(err, directory):
    message = str(err)
    assert str(directory) in message and "\n" not in message
    for advice in ("BNJAX_DATA_DIR", "--data-dir", "--data bundled"):
        assert advice in message, (advice, message)


def _unwritable_cache(kind, tmp_path, monkeypatch):
    """Point the cache at an unusable directory; return the directory the message must name."""
    monkeypatch.delenv("BNJAX_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if kind == "file":
        cache = tmp_path / "a-file"
        cache.write_text("not a directory")
    elif kind == "under-a-file":
        (tmp_path / "a-file").write_text("not a directory")
        cache = tmp_path / "a-file" / "cache"
    elif kind == "read-only":
        cache = tmp_path / "read-only"
        cache.mkdir()
        cache.chmod(0o500)
        if os.access(cache, os.W_OK):
            cache.chmod(0o700)
            pytest.skip("running as root: chmod does not stop writing (the simulated case covers it)")
    elif kind == "no-home":
        home = tmp_path / "no-such-home"
        monkeypatch.setenv("HOME", str(home))
        return home, home
    if kind != "no-home":
        monkeypatch.setenv("BNJAX_DATA_DIR", str(cache))
    return cache, cache


@pytest.mark.parametrize("kind", ["file", "under-a-file", "read-only", "no-home"])
def test_unusable_cache_is_refused_with_advice(kind, tmp_path, monkeypatch):
    cache, must_not_create = _unwritable_cache(kind, tmp_path, monkeypatch)
    try:
        with pytest.raises(data.DataUnavailableError) as exc:
            data.load_mnist_idx(None, 10, 5, base_url=UNREACHABLE, timeout=2)
        _assert_cache_advice(exc.value, cache)
        assert "could not download" not in str(exc.value)  # the cache is the problem, not the network
        if kind == "no-home":
            assert not must_not_create.exists()  # a missing home directory is not created (even as root)
        if kind == "read-only":
            assert not list(cache.iterdir())  # no temporary file left
    finally:
        if kind == "read-only":
            cache.chmod(0o700)


def test_read_only_cache_simulated(fake_mnist, tmp_path, monkeypatch):
    """A read-only file system (as root, where chmod cannot make one): refused; verified files still load."""
    import errno
    import tempfile

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("BNJAX_DATA_DIR", str(cache))
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(data.DataUnavailableError, match="Read-only file system") as exc:
        data.load_mnist_idx(None, 10, 5, base_url=fake_mnist["url"], checksums=fake_mnist["checksums"], timeout=5)
    _assert_cache_advice(exc.value, cache)
    # Once the files are there, a read-only cache is fine: nothing needs writing.
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    data.download_mnist(cache, base_url=fake_mnist["url"], checksums=fake_mnist["checksums"], timeout=5)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    ds = data.load_mnist_idx(None, 10, 5, base_url=UNREACHABLE, checksums=fake_mnist["checksums"], timeout=2)
    assert ds.source["files_sha256"] == fake_mnist["checksums"]


def test_write_failure_mid_download_blames_the_cache_not_the_network(fake_mnist, tmp_path, monkeypatch):
    import contextlib
    import errno

    class Full:
        name = str(tmp_path / "never")

        def write(self, chunk):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.idx, "atomic_file", lambda *args: contextlib.nullcontext(Full()))
    with pytest.raises(data.DataUnavailableError, match="No space left on device") as exc:
        data.download_mnist(tmp_path / "cache", base_url=fake_mnist["url"], checksums=fake_mnist["checksums"])
    assert "could not download" not in str(exc.value)
    _assert_cache_advice(exc.value, tmp_path / "cache")


@pytest.mark.slow  # a command in a fresh process (imports jax)
def test_cli_with_unusable_cache_exits_1_without_traceback(tmp_path):
    cache = tmp_path / "a-file"
    cache.write_text("not a directory")
    proc = run_cli("experiments.sweep", "--data", "mnist", "--scales", "0.1", "--epochs", "1", "--no-plot",
                "--no-cache", "--out", str(tmp_path / "out"), timeout=120, BNJAX_DATA_DIR=str(cache))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: could not load data (mnist)" in proc.stderr and str(cache) in proc.stderr
    assert "--data bundled" in proc.stderr
    assert cache.read_text() == "not a directory"


# --------------------------------------------------------------------------------------------------
# idx files in a directory: every file validated and checksum-verified, compressed or not
# --------------------------------------------------------------------------------------------------


def _raw_idx(array: np.ndarray) -> bytes:
    return gzip.decompress(_idx_bytes(array))


def _synthetic(n_train=8, n_test=5, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def _write(directory, blobs: dict, compressed: bool) -> dict:
    """Write ``{gz name: raw idx bytes}`` gzipped (under the .gz name) or raw; return {gz name: sha256 written}."""
    directory.mkdir(exist_ok=True)
    written = {}
    for name, raw in blobs.items():
        blob = gzip.compress(raw, mtime=0) if compressed else raw
        (directory / (name if compressed else name.removesuffix(".gz"))).write_bytes(blob)
        written[name] = hashlib.sha256(blob).hexdigest()
    return written


def _raw_sums(sums: dict) -> dict:
    """``_write``'s checksums of uncompressed files, keyed as ``raw_checksums`` is (the uncompressed names)."""
    return {n.removesuffix(".gz"): s for n, s in sums.items()}


def test_good_uncompressed_set_loads_and_records_the_files_read(tmp_path):
    arrays = _synthetic()
    blobs = {n: _raw_idx(a) for n, a in arrays.items()}
    sums = _write(tmp_path / "raw", blobs, compressed=False)
    ds = data.load_mnist_idx(tmp_path / "raw", 6, 4, raw_checksums=_raw_sums(sums))
    assert ds.source["files_sha256"] == _raw_sums(sums)
    assert ds.source["path"] == str(tmp_path / "raw")
    np.testing.assert_array_equal(ds.t_train, arrays["train-labels-idx1-ubyte.gz"][:6])
    np.testing.assert_array_equal(ds.t_heldout, arrays["t10k-labels-idx1-ubyte.gz"][:4])
    images = arrays["train-images-idx3-ubyte.gz"][:6].reshape(6, 784)
    np.testing.assert_array_equal(ds.x_train, images.astype(np.float32) / 255.0)
    assert len(ds.source["train_class_counts"]) == 10
    # The same data gzipped (checked against its own checksums) loads bit-identically.
    gz_sums = _write(tmp_path / "gz", blobs, compressed=True)
    gz = data.load_mnist_idx(tmp_path / "gz", 6, 4, checksums=gz_sums)
    assert gz.source["files_sha256"] == gz_sums
    for a, b in zip(ds[:4], gz[:4]):
        np.testing.assert_array_equal(a, b)
    assert ds.source["train_sha256"] == gz.source["train_sha256"]


def _bad_magic(arrays):
    raw = bytearray(_raw_idx(arrays["train-images-idx3-ubyte.gz"]))
    raw[2] = 0x0D  # float instead of unsigned byte
    return "train-images-idx3-ubyte.gz", bytes(raw)


def _label_200(arrays):
    labels = arrays["train-labels-idx1-ubyte.gz"].copy()
    labels[3] = 200
    return "train-labels-idx1-ubyte.gz", _raw_idx(labels)


def _fewer_labels(arrays):
    return "t10k-labels-idx1-ubyte.gz", _raw_idx(arrays["t10k-labels-idx1-ubyte.gz"][:-1])


def _truncated(arrays):
    return "t10k-images-idx3-ubyte.gz", _raw_idx(arrays["t10k-images-idx3-ubyte.gz"])[:-100]


def _header_only(arrays):
    return "train-labels-idx1-ubyte.gz", bytes.fromhex("00000801")  # a 1-d header needs 8 bytes


def _wrong_image_shape(arrays):
    return "train-images-idx3-ubyte.gz", _raw_idx(arrays["train-images-idx3-ubyte.gz"].reshape(8, 28 * 28))


def _labels_2d(arrays):
    return "t10k-labels-idx1-ubyte.gz", _raw_idx(arrays["t10k-labels-idx1-ubyte.gz"].reshape(5, 1))


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("spoil, message", [
    (_bad_magic, "magic"), (_label_200, "label 200"), (_fewer_labels, "4 labels"), (_truncated, "header says"),
    (_header_only, "header truncated"), (_wrong_image_shape, r"\[N, 28, 28\]"), (_labels_2d, r"shape \[N\]"),
])
def test_malformed_idx_file_is_refused_naming_it(spoil, message, compressed, tmp_path):
    arrays = _synthetic()
    blobs = {n: _raw_idx(a) for n, a in arrays.items()}
    name, blobs[name] = spoil(arrays)
    sums = _write(tmp_path, blobs, compressed)
    bad_file = tmp_path / (name if compressed else name.removesuffix(".gz"))
    with pytest.raises((ValueError, data.DataUnavailableError), match=message) as exc:
        # Checksums that match these files, so that only their contents are wrong.
        data.load_mnist_idx(tmp_path, 3, 2, checksums=sums, raw_checksums=_raw_sums(sums))
    assert str(bad_file) in str(exc.value)
    # With the standard checksums the structure is still what is reported: the more specific message.
    with pytest.raises(ValueError, match=message):
        data.load("mnist", 3, 2, data_dir=tmp_path)


def test_downloaded_files_are_validated_too(fake_mnist, tmp_path, monkeypatch):
    labels = fake_mnist["arrays"]["train-labels-idx1-ubyte.gz"].copy()
    labels[0] = 200
    blob = _idx_bytes(labels)
    (fake_mnist["served"] / "train-labels-idx1-ubyte.gz").write_bytes(blob)
    sums = dict(fake_mnist["checksums"], **{"train-labels-idx1-ubyte.gz": hashlib.sha256(blob).hexdigest()})
    monkeypatch.setenv("BNJAX_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="label 200") as exc:
        data.load_mnist_idx(None, 10, 5, base_url=fake_mnist["url"], checksums=sums, timeout=5)
    assert str(tmp_path / "cache" / "train-labels-idx1-ubyte.gz") in str(exc.value)


def test_gz_in_data_dir_must_be_the_standard_file(tmp_path):
    blobs = {n: _raw_idx(a) for n, a in _synthetic().items()}
    raw_sums = _raw_sums(_write(tmp_path, blobs, compressed=False))
    # One synthetic .gz among uncompressed files that pass: the .gz is preferred, checked, and refused.
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    _write(tmp_path, {"train-labels-idx1-ubyte.gz": blobs["train-labels-idx1-ubyte.gz"]}, compressed=True)
    with pytest.raises(data.ChecksumError, match="does not match the standard MNIST file;") as exc:
        data.load_mnist_idx(tmp_path, 3, 2, raw_checksums=raw_sums)
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(exc.value)
    with pytest.raises(data.ChecksumError):  # also for "auto", which reads a given directory the same way
        data.load("auto", 3, 2, data_dir=tmp_path)


def test_uncompressed_files_must_be_the_standard_files(tmp_path):
    """Random bytes under valid idx headers are not MNIST: refused like a wrong .gz, naming the file (item 9)."""
    arrays = _synthetic()
    blobs = {n: _raw_idx(a) for n, a in arrays.items()}
    sums = _raw_sums(_write(tmp_path, blobs, compressed=False))
    for source in ("mnist", "auto"):  # "auto" reads a given directory the same way
        with pytest.raises(data.ChecksumError, match=r"not match the standard MNIST file \(uncompressed\)") as exc:
            data.load(source, 3, 2, data_dir=tmp_path)
        message = str(exc.value)
        assert str(tmp_path / "train-images-idx3-ubyte") in message and "\n" not in message
    # Every file is checked, not just the first: one changed label in the last file, the other three pass.
    labels = arrays["t10k-labels-idx1-ubyte.gz"].copy()
    labels[0] = (labels[0] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_raw_idx(labels))
    with pytest.raises(data.ChecksumError) as exc:
        data.load_mnist_idx(tmp_path, 3, 2, raw_checksums=sums)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(exc.value)
    assert hashlib.sha256(_raw_idx(labels)).hexdigest() in str(exc.value)
    # The standard checksums cover exactly the four files, under their uncompressed names, and differ from the .gz.
    assert sorted(data.MNIST_RAW_FILES) == sorted(n.removesuffix(".gz") for n in data.MNIST_FILES)
    assert not set(data.MNIST_RAW_FILES.values()) & set(data.MNIST_FILES.values())
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in data.MNIST_RAW_FILES.values())


@pytest.mark.parametrize("damage", ["not gzip", "truncated gzip"])
def test_broken_gzip_is_a_value_error_naming_the_file(damage, tmp_path):
    blob = _idx_bytes(np.zeros(6))
    blob = b"plain bytes, not gzip" if damage == "not gzip" else blob[: len(blob) // 2]
    path = tmp_path / "labels.gz"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match="not a valid gzip file") as exc:
        data.read_idx(path)
    assert str(path) in str(exc.value)


def test_gzipped_file_without_gz_name_says_so(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(np.zeros(6)))
    with pytest.raises(ValueError, match="name it train-labels-idx1-ubyte.gz"):
        data.read_idx(path)


# --------------------------------------------------------------------------------------------------
# Advice in terms of the command line (and the Python arguments)
# --------------------------------------------------------------------------------------------------


def test_messages_name_the_command_line_options(tmp_path, monkeypatch):
    messages = []
    with pytest.raises(data.DataUnavailableError) as exc:
        data.download_mnist(tmp_path / "c", base_url=UNREACHABLE, timeout=2)
    messages.append(str(exc.value))
    assert "--data bundled" in messages[-1] and "--data-dir" in messages[-1]
    (tmp_path / "d").mkdir()
    with pytest.raises(data.DataUnavailableError) as exc:
        data.load("mnist", 3, 2, data_dir=tmp_path / "d")
    messages.append(str(exc.value))
    assert "--data bundled" in messages[-1] and "train-images-idx3-ubyte" in messages[-1]
    monkeypatch.setenv("BNJAX_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(data.DataUnavailableError) as exc:
        data.load_mnist_idx(None, 3, 2, download=False)
    messages.append(str(exc.value))
    assert "--data mnist" in messages[-1] and "--data-dir" in messages[-1]
    with pytest.raises(data.DataUnavailableError) as exc:
        data.tfds._with_timeout(lambda: __import__("time").sleep(2), 0.05, "slow tfds")
    messages.append(str(exc.value))
    assert "--data bundled" in messages[-1] and "--data mnist" in messages[-1]
    for message in messages:
        assert "source '" not in message and "pass it as data_dir" not in message, message
        assert "\n" not in message
