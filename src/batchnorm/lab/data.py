"""Datasets for the lab: MNIST-1D (embedded default), Fashion-MNIST / MNIST (IDX files), digits.

Every loader returns a :class:`Dataset` with train / validation / test splits. The validation split is
carved from the training split with a seeded permutation; normalization statistics (one mean and one
standard deviation over all training pixels) are computed on the *training split only* and applied
to all three splits.

IDX files are searched in ``--data-dir``, then ``/usr/share/datasets/<name>/`` (Debian's
``dataset-fashion-mnist``), then the cache directory; when none has them they are downloaded from the
official URLs and verified with SHA-256 before use.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "DataUnavailable",
    "IdxFile",
    "cache_dir",
    "download_verified",
    "load_dataset",
    "parse_idx",
    "read_idx",
]


class DataUnavailable(RuntimeError):
    """Raised when a dataset cannot be found locally nor downloaded; the message says what to do."""


def cache_dir() -> Path:
    """``$BATCHNORM_CACHE`` or ``$XDG_CACHE_HOME/batchnorm`` or ``~/.cache/batchnorm``."""
    env = os.environ.get("BATCHNORM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchnorm"


@dataclass
class Dataset:
    """Float32 inputs in their natural shape (``(N, C, L)`` or ``(N, C, H, W)``) and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: float = 0.0
    std: float = 1.0
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def summary(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train": len(self.y_train),
            "val": len(self.y_val),
            "test": len(self.y_test),
            "mean": self.mean,
            "std": self.std,
            **self.info,
        }


# ----------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse the bytes of an IDX file (optionally gzip-compressed) into a numpy array.

    Layout (LeCun's MNIST page): two zero bytes, a type byte (0x08 ubyte, 0x09 byte, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), a byte with the number of dimensions, one big-endian
    uint32 per dimension, then the data in C order, big-endian.
    """
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError("not an IDX file: the first two bytes must be zero")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"not an IDX file: unknown type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError("truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(dims)) if ndim else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"IDX size mismatch: header says {dims} ({count * dtype.itemsize} bytes), "
            f"file has {len(raw) - header} bytes of data"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header, count=count).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    return parse_idx(Path(path).read_bytes())


def write_idx(arr: np.ndarray, path: str | os.PathLike, compress: bool | None = None) -> None:
    """Write ``arr`` as an IDX file (gzip when ``path`` ends with .gz). Used by the tests and tools."""
    inverse = {v.str.lstrip("<>|="): k for k, v in _IDX_DTYPES.items()}
    big = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    code = inverse.get(big.str.lstrip("<>|="))
    if code is None:
        raise ValueError(f"dtype {arr.dtype} has no IDX type code")
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data += np.ascontiguousarray(arr.astype(big)).tobytes()
    path = Path(path)
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


@dataclass(frozen=True)
class IdxFile:
    """One IDX file of a dataset: file name, SHA-256 of the .gz as published, SHA-256 of its content.

    ``sha256`` checks the downloaded archive byte for byte; ``content_sha256`` checks the decompressed
    IDX bytes (independent of how the archive was compressed, so it also matches repackaged copies).
    At least one of them is known for every file we download.
    """

    name: str
    sha256: str | None = None
    content_sha256: str | None = None


_IDX_SETS: dict[str, dict] = {
    "mnist": {
        "urls": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ],
        "files": {
            "train_x": IdxFile(
                "train-images-idx3-ubyte.gz",
                sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            "train_y": IdxFile(
                "train-labels-idx1-ubyte.gz",
                sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
            "test_x": IdxFile(
                "t10k-images-idx3-ubyte.gz",
                sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            "test_y": IdxFile(
                "t10k-labels-idx1-ubyte.gz",
                sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        },
    },
    "fashion-mnist": {
        "urls": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "files": {
            "train_x": IdxFile(
                "train-images-idx3-ubyte.gz",
                content_sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            "train_y": IdxFile(
                "train-labels-idx1-ubyte.gz",
                content_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            "test_x": IdxFile(
                "t10k-images-idx3-ubyte.gz",
                content_sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            "test_y": IdxFile(
                "t10k-labels-idx1-ubyte.gz",
                content_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        },
    },
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(data: bytes, spec: IdxFile) -> None:
    """Raise ``ValueError`` unless ``data`` matches the known SHA-256 of ``spec``."""
    if spec.sha256 is None and spec.content_sha256 is None:
        raise ValueError(f"no known SHA-256 for {spec.name}; refusing to trust a download")
    if spec.sha256 is not None and _sha256(data) == spec.sha256:
        return
    if spec.content_sha256 is not None:
        content = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        if _sha256(content) == spec.content_sha256:
            return
    raise ValueError(f"SHA-256 mismatch for {spec.name}: the download is corrupt or not the official file")


Opener = Callable[[str], bytes]


def _urlopen(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (http(s) URLs only by default)
        return response.read()


def download_verified(
    spec: IdxFile, base_urls: list[str], dest_dir: Path, opener: Opener | None = None
) -> Path:
    """Fetch ``spec.name`` from the first base URL that answers with verified bytes; atomic write.

    ``opener(url) -> bytes`` defaults to ``urllib`` (which also understands ``file://`` URLs).
    """
    opener = opener or _urlopen
    errors = []
    for base in base_urls:
        url = base.rstrip("/") + "/" + spec.name
        try:
            data = opener(url)
            verify(data, spec)
        except Exception as exc:  # network error or checksum mismatch: try the next mirror
            errors.append(f"{url}: {exc}")
            continue
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".part-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest_dir / spec.name)
        return dest_dir / spec.name
    raise DataUnavailable("; ".join(errors) or f"no URL to download {spec.name}")


def _find_local(name: str, filename: str, data_dir: str | os.PathLike | None) -> Path | None:
    stem = filename[:-3] if filename.endswith(".gz") else filename
    candidates: list[Path] = []
    if data_dir is not None:
        d = Path(data_dir)
        candidates += [d / filename, d / stem, d / name / filename, d / name / stem]
    candidates += [Path("/usr/share/datasets") / name / filename, Path("/usr/share/datasets") / name / stem]
    c = cache_dir() / name
    candidates += [c / filename, c / stem]
    for path in candidates:
        if path.is_file():
            return path
    return None


def load_idx_set(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    opener: Opener | None = None,
    base_urls: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Return ``{"train_x", "train_y", "test_x", "test_y"}`` arrays for an IDX dataset."""
    spec = _IDX_SETS[name]
    out: dict[str, np.ndarray] = {}
    for key, f in spec["files"].items():
        path = _find_local(name, f.name, data_dir)
        if path is None:
            if not download:
                raise DataUnavailable(_missing_message(name, data_dir))
            try:
                path = download_verified(f, base_urls or spec["urls"], cache_dir() / name, opener)
            except DataUnavailable as exc:
                raise DataUnavailable(_missing_message(name, data_dir) + f"\n(download failed: {exc})") from exc
        out[key] = read_idx(path)
    if out["train_x"].shape[0] != out["train_y"].shape[0] or out["test_x"].shape[0] != out["test_y"].shape[0]:
        raise ValueError(f"{name}: image and label files disagree on the number of examples")
    return out


def _missing_message(name: str, data_dir) -> str:
    files = ", ".join(f.name for f in _IDX_SETS[name]["files"].values())
    where = f"--data-dir {data_dir}, " if data_dir else ""
    hint = (
        "On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist/."
        if name == "fashion-mnist"
        else "Download them from the official mirror and pass --data-dir DIR."
    )
    return (
        f"dataset {name!r} is not available: looked for {files} in {where}/usr/share/datasets/{name}/ "
        f"and {cache_dir() / name}, and could not download them. {hint} "
        "Or use --dataset mnist1d (generated offline)."
    )


# --------------------------------------------------------------------------------------------- build


def _split_normalize(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    val_fraction: float,
    seed: int,
    limit: int | None,
    info: dict,
) -> Dataset:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_val = int(round(len(y) * val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if limit is not None:
        train_idx = train_idx[:limit]
        val_idx = val_idx[: max(1, limit // 4)] if n_val else val_idx
        test_sel = np.random.default_rng(seed + 1).permutation(len(y_test))[: max(1, limit // 2)]
        x_test, y_test = x_test[test_sel], y_test[test_sel]
    x = x.astype(np.float32)
    x_train = x[train_idx]
    mean = float(x_train.mean(dtype=np.float64))
    std = float(x_train.std(dtype=np.float64)) or 1.0

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a.astype(np.float32) - mean) / std).astype(np.float32)

    return Dataset(
        name=name,
        x_train=norm(x_train),
        y_train=y[train_idx].astype(np.int64),
        x_val=norm(x[val_idx]),
        y_val=y[val_idx].astype(np.int64),
        x_test=norm(x_test),
        y_test=y_test.astype(np.int64),
        num_classes=num_classes,
        mean=mean,
        std=std,
        info=info,
    )


def _mnist1d_raw(seed: int, num_samples: int) -> dict[str, np.ndarray]:
    path = cache_dir() / f"mnist1d-seed{seed}-n{num_samples}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # a corrupt cache file is regenerated
            pass
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    d = make_dataset(args)
    raw = {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **raw)
        os.replace(tmp, path)
    except OSError:  # read-only home: work without a cache
        pass
    return raw


def load_mnist1d(seed: int = 42, val_fraction: float = 0.1, limit: int | None = None, **_) -> Dataset:
    """MNIST-1D (Greydanus 2020): 4000 train / 1000 test sequences of 40 values, 10 classes."""
    raw = _mnist1d_raw(seed, 5000)
    x = raw["x"][:, None, :]
    x_test = raw["x_test"][:, None, :]
    return _split_normalize(
        "mnist1d", x, raw["y"], x_test, raw["y_test"], 10, val_fraction, seed, limit,
        {"source": f"mnist1d.make_dataset(seed={seed})"},
    )


def _load_idx_dataset(name: str, data_dir=None, val_fraction: float = 1 / 12, seed: int = 0,
                      limit: int | None = None, download: bool = True, **_) -> Dataset:
    arrays = load_idx_set(name, data_dir=data_dir, download=download)
    x = arrays["train_x"][:, None].astype(np.float32) / 255.0
    x_test = arrays["test_x"][:, None].astype(np.float32) / 255.0
    return _split_normalize(
        name, x, arrays["train_y"], x_test, arrays["test_y"], 10, val_fraction, seed, limit,
        {"source": "IDX files"},
    )


def load_digits_dataset(seed: int = 0, val_fraction: float = 0.1, limit: int | None = None, **_) -> Dataset:
    """scikit-learn's 1797 8x8 digits; a seeded 80/20 train/test split (no official one exists)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # optional dependency
        raise DataUnavailable("dataset 'digits' needs scikit-learn: pip install 'batchnorm[digits]'") from exc
    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0
    y = d.target
    perm = np.random.default_rng(12345).permutation(len(y))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return _split_normalize(
        "digits", x[tr], y[tr], x[te], y[te], 10, val_fraction, seed, limit, {"source": "sklearn.load_digits"}
    )


DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": load_mnist1d,
    "fashion-mnist": lambda **kw: _load_idx_dataset("fashion-mnist", **kw),
    "mnist": lambda **kw: _load_idx_dataset("mnist", **kw),
    "digits": load_digits_dataset,
}

_MEMO: dict[tuple, Dataset] = {}


def load_dataset(
    name: str = "mnist1d",
    *,
    seed: int | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    val_fraction: float | None = None,
) -> Dataset:
    """Load a dataset by name (memoized per process). ``limit`` caps the training split (tests)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    key = (name, seed, data_dir, limit, val_fraction)
    if key not in _MEMO:
        kw: dict = {"data_dir": data_dir, "limit": limit}
        if seed is not None:
            kw["seed"] = seed
        if val_fraction is not None:
            kw["val_fraction"] = val_fraction
        _MEMO[key] = DATASETS[name](**kw)
    return _MEMO[key]
