"""Datasets: the IDX parser against hand-built bytes, verified downloads, splits and normalization."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batchnorm.lab import data as D
from batchnorm.lab import sources


def _idx_bytes(arr: np.ndarray, code: int, be_dtype: str) -> bytes:
    """Independent IDX writer, straight from the format description."""
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(be_dtype).tobytes()


@pytest.mark.parametrize("code,dt", [(0x08, "u1"), (0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"),
                                     (0x0E, ">f8")])
def test_parse_idx_all_types(code, dt):
    rng = np.random.default_rng(0)
    arr = (rng.integers(-100, 100, size=(3, 4, 5)) if dt[-2] != "f" else rng.normal(size=(3, 4, 5)))
    if dt == "u1":
        arr = np.abs(arr)
    raw = _idx_bytes(arr, code, dt)
    out = D.parse_idx(raw)
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr.astype(dt))
    np.testing.assert_array_equal(D.parse_idx(gzip.compress(raw)), out)


def test_parse_idx_rejects_garbage():
    with pytest.raises(ValueError, match="not an IDX"):
        D.parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="size mismatch"):
        D.parse_idx(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x00\x01")
    with pytest.raises(ValueError, match="type code"):
        D.parse_idx(bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + b"\x00")


def test_write_idx_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    D.write_idx(arr, tmp_path / "a.gz")
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a.gz"), arr)
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == _idx_bytes(arr, 0x08, "u1")


def _tiny_idx_dir(path, n_train=40, n_test=20, side=6):
    rng = np.random.default_rng(1)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        (path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x, 8, "u1")))
        (path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(y, 8, "u1")))
        files[prefix] = (x, y)
    return files


def test_download_verified_file_url(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    payload = gzip.compress(_idx_bytes(np.arange(10, dtype=np.uint8), 8, "u1"))
    (src / "f.gz").write_bytes(payload)
    good = D.IdxFile("f.gz", sha256=hashlib.sha256(payload).hexdigest())
    dest = tmp_path / "dest"
    path = D.download_verified(good, ["file:///nonexistent-mirror/", src.as_uri()], dest)
    assert path.read_bytes() == payload
    # verification by the SHA-256 of the decompressed content (repackaged archives)
    content = D.IdxFile("f.gz", content_sha256=hashlib.sha256(gzip.decompress(payload)).hexdigest())
    assert D.download_verified(content, [src.as_uri()], tmp_path / "d2").is_file()
    bad = D.IdxFile("f.gz", sha256="0" * 64)
    with pytest.raises(D.DataUnavailable, match="SHA-256 mismatch"):
        D.download_verified(bad, [src.as_uri()], tmp_path / "d3")
    assert not (tmp_path / "d3" / "f.gz").exists()


def test_download_with_opener_and_no_hash():
    calls = []

    def opener(url):
        calls.append(url)
        return b"data"

    with pytest.raises(D.DataUnavailable, match="no known SHA-256"):
        D.download_verified(D.IdxFile("x.gz"), ["http://example.invalid/"], __import__("pathlib").Path("/tmp"),
                            opener)
    assert calls == ["http://example.invalid/x.gz"]


def test_idx_dataset_from_data_dir(tmp_path):
    """Your own IDX files (``--dataset idx``): any size, split and normalized like the public sets."""
    files = _tiny_idx_dir(tmp_path)
    ds = D.load_dataset("idx", data_dir=str(tmp_path), val_fraction=0.25)
    assert ds.input_shape == (1, 6, 6)
    assert len(ds.y_train) == 30 and len(ds.y_val) == 10 and len(ds.y_test) == 20
    # normalization statistics come from the training split only
    x_all = files["train"][0].astype(np.float64) / 255.0
    train_rows = [i for i in range(40) if any(np.allclose(ds.x_train[j, 0] * ds.std + ds.mean, x_all[i], atol=1e-5)
                                              for j in range(len(ds.y_train)))]
    assert len(train_rows) == 30
    ref = x_all[train_rows]
    assert ds.mean == pytest.approx(ref.mean(), rel=1e-6)
    assert ds.std == pytest.approx(ref.std(), rel=1e-6)
    np.testing.assert_allclose(ds.x_test[:, 0] * ds.std + ds.mean, files["t10k"][0] / 255.0, atol=1e-5)
    np.testing.assert_array_equal(ds.y_test, files["t10k"][1])


def test_missing_dataset_message(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_urlopen", lambda url: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(sources, "_find_local", lambda *a: None)
    with pytest.raises(D.DataUnavailable, match="--dataset mnist1d"):
        D.load_idx_set("mnist", data_dir=str(tmp_path))


def test_download_fallback_through_load_idx_set(tmp_path, monkeypatch):
    """No local files: the loader downloads from the (file://) mirror, verifies, caches, parses."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _tiny_idx_dir(mirror)
    specs = {k: D.IdxFile(f.name, sha256=hashlib.sha256((mirror / f.name).read_bytes()).hexdigest())
             for k, f in D._IDX_SETS["mnist"]["files"].items()}
    monkeypatch.setitem(D._IDX_SETS, "mnist", {"urls": [mirror.as_uri()], "files": specs})
    monkeypatch.setattr(sources, "_find_local", lambda name, filename, data_dir: (
        D.cache_dir() / name / filename if (D.cache_dir() / name / filename).is_file() else None))
    arrays = D.load_idx_set("mnist")
    assert arrays["train_x"].shape == (40, 6, 6)
    assert (D.cache_dir() / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_mnist1d_splits():
    ds = D.load_dataset("mnist1d")
    assert ds.input_shape == (1, 40)
    assert len(ds.y_train) + len(ds.y_val) == 4000 and len(ds.y_test) == 1000
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3
    # val and train are disjoint rows
    tr = {row.tobytes() for row in ds.x_train[:, 0]}
    assert not any(row.tobytes() in tr for row in ds.x_val[:, 0])
    small = D.load_dataset("mnist1d", limit=100)
    assert len(small.y_train) == 100


def test_digits():
    pytest.importorskip("sklearn")
    ds = D.load_dataset("digits")
    assert ds.input_shape == (1, 8, 8)
    assert len(ds.y_train) + len(ds.y_val) + len(ds.y_test) == 1797


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("cifar")


# ------------------------------------------------------------------ data identity and checked local files
# (local IDX files must be checked, and runs on other data never reused as the real dataset)

FASHION_ID = "sha256:17ab7fb6d77d6a8863aac2f8bb416e6c"  # identity of the official Fashion-MNIST content
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _official_like(path, monkeypatch, name="fashion-mnist", n_train=40, n_test=20, side=6):
    """Make tiny files and declare them the official ``name`` (its published digests monkeypatched to
    theirs): the checks run as on the real set without 30 MB of data."""
    path.mkdir(parents=True, exist_ok=True)
    _tiny_idx_dir(path, n_train, n_test, side)
    spec = dict(D._IDX_SETS[name])
    spec["files"] = {k: D.IdxFile(f.name, md5=hashlib.md5((path / f.name).read_bytes()).hexdigest())
                     for k, f in spec["files"].items()}
    spec["shapes"] = {"train_x": (n_train, side, side), "train_y": (n_train,), "test_x": (n_test, side, side),
                      "test_y": (n_test,)}
    monkeypatch.setitem(D._IDX_SETS, name, spec)
    return path


def test_public_dataset_refuses_files_that_are_not_the_official_ones(tmp_path, monkeypatch):
    official = _official_like(tmp_path / "official", monkeypatch)
    assert D.data_identity("fashion-mnist", official).startswith("sha256:")
    fake = tmp_path / "fake"
    fake.mkdir()
    rng = np.random.default_rng(7)  # same shapes, other content
    for prefix, n in (("train", 40), ("t10k", 20)):
        D.write_idx(rng.integers(0, 256, (n, 6, 6), dtype=np.uint8), fake / f"{prefix}-images-idx3-ubyte.gz")
        D.write_idx(rng.integers(0, 10, n, dtype=np.uint8), fake / f"{prefix}-labels-idx1-ubyte.gz")
    with pytest.raises(D.DataError, match="not the official fashion-mnist file"):
        D.data_identity("fashion-mnist", fake)
    with pytest.raises(D.DataError, match="not the official"):
        D.load_dataset("fashion-mnist", data_dir=str(fake))
    # the same bytes recompressed (as Debian did) are still the official content only if a content digest
    # is known; the published archive digest alone does not cover them
    recompressed = tmp_path / "recompressed"
    recompressed.mkdir()
    for f in official.iterdir():
        (recompressed / f.name).write_bytes(gzip.compress(gzip.decompress(f.read_bytes()), compresslevel=1))
    with pytest.raises(D.DataError, match="not the official"):
        D.data_identity("fashion-mnist", recompressed)
    # as your own dataset the fake files are fine, under their own identity
    assert D.data_identity("idx", fake) != D.data_identity("idx", official)


def test_public_dataset_checks_shapes_and_labels(tmp_path):
    """The real shapes (60000/10000 x 28x28) and labels 0..9, with a message naming the file."""
    small = tmp_path / "small"
    small.mkdir()
    _tiny_idx_dir(small, side=10)
    with pytest.raises(D.DataError, match=r"shape 40x10x10; fashion-mnist's is 60000x28x28"):
        D.data_identity("fashion-mnist", small)
    labels = tmp_path / "labels"
    labels.mkdir()
    zeros = np.zeros((60000, 28, 28), np.uint8)
    D.write_idx(zeros, labels / "train-images-idx3-ubyte.gz")
    D.write_idx(np.full(60000, 12, np.uint8), labels / "train-labels-idx1-ubyte.gz")
    with pytest.raises(D.DataError, match="holds label 12; labels must be 0..9"):
        D.data_identity("fashion-mnist", labels)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-idx"])
def test_damaged_files_are_a_clear_error(tmp_path, damage):
    _tiny_idx_dir(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    raw = f.read_bytes()
    f.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": raw[:10] + b"\xff" * 50,
                   "not-idx": gzip.compress(b"hello world")}[damage])
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte.gz \(training images of idx\) is unusable"):
        D.data_identity("idx", tmp_path)


def test_identity_is_the_content_not_the_place(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    _tiny_idx_dir(a)
    b.mkdir()
    for f in a.iterdir():  # the same content, decompressed: same identity
        (b / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    assert D.data_identity("idx", a) == D.data_identity("idx", b)
    assert D.load_dataset("idx", data_dir=str(a)).info["data_id"] == D.data_identity("idx", a)


def test_mnist1d_cache_is_checked(tmp_path, monkeypatch):
    """An altered MNIST-1D cache file is not used: the data is generated again (known identity)."""
    real, ident = D._mnist1d_raw_id(42, 5000)
    assert ident == D.MNIST1D_IDENTITY[(42, 5000)]
    monkeypatch.setenv("BATCHNORM_CACHE", str(tmp_path))
    altered = {k: v.copy() for k, v in real.items()}
    altered["y"][:10] = (altered["y"][:10] + 1) % 10
    np.savez(tmp_path / "mnist1d-seed42-n5000.npz", **altered)
    calls = []
    monkeypatch.setattr(D, "_generate_mnist1d", lambda seed, n: calls.append(seed) or real)
    raw, ident2 = D._mnist1d_raw_id(42, 5000)
    assert calls == [42] and ident2 == ident
    np.testing.assert_array_equal(raw["y"], real["y"])


def test_mnist1d_identity_is_the_same_without_numpy_avx512_kernels():
    """MNIST-1D is generated on every machine, and its identity is in every run's key. numpy's AVX-512
    kernels (``X86_V4``) give the generator's float64 values a few ulps away from its AVX2 ones, so on
    an AVX-512 Xeon the identity differed from an AVX2-only EPYC's (this test's assertion failed, and
    so did the known-identity check above). With those kernels disabled in a subprocess (what an
    AVX2-only CPU runs), the data and identity must be the same as here."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        pytest.skip("numpy < 2 names its CPU features differently")
    if "X86_V4" not in __cpu_dispatch__ or not __cpu_features__.get("X86_V4"):
        pytest.skip("needs numpy >= 2.4 on a CPU with AVX-512 (numpy's X86_V4 kernels)")
    code = "from batchnorm.lab import data as D; print(D._raw_identity(D._generate_mnist1d(42, 5000)))"
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": "X86_V4"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    here = D._raw_identity(D._generate_mnist1d(42, 5000))
    assert out.stdout.strip() == here == D.MNIST1D_IDENTITY[(42, 5000)]


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_is_the_official_content(tmp_path):
    """Debian's recompressed archives pass by content; a copy elsewhere has the same identity."""
    assert D.data_identity("fashion-mnist") == FASHION_ID
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in DEBIAN.iterdir():
        (copy / f.name).symlink_to(f)
    assert D.data_identity("fashion-mnist", copy) == FASHION_ID
    ds = D.load_dataset("fashion-mnist", limit=50)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.info["data_id"] == FASHION_ID
