"""Datasets for the lab: MNIST-1D (embedded default), Fashion-MNIST / MNIST (IDX files), digits.

Every loader returns a :class:`Dataset` with train / validation / test splits. The validation split is
carved from the training split with a seeded permutation; normalization statistics (one mean and one
standard deviation over all training pixels) are computed on the *training split only* and applied
to all three splits.

IDX files are searched in ``--data-dir``, then ``/usr/share/datasets/<name>/`` (Debian's
``dataset-fashion-mnist``), then the cache directory; when none has them they are downloaded from the
official URLs. Every file of a public dataset (``mnist``, ``fashion-mnist``), wherever it was found, is
checked before use: its shapes and label range, and its digest against the published one (SHA-256 or
MD5 of the ``.gz``, or the SHA-256 of the decompressed content); a file that does not match is refused
with :class:`DataError`. Your own IDX files go through ``--dataset idx --data-dir DIR``.

Every loaded dataset carries a *data identity* (``Dataset.info["data_id"]``, :func:`data_identity`):
the SHA-256 over the SHA-256 of each array's bytes as read. The lab puts it into every run's key, so a run
is reused only for the same data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "DataUnavailable",
    "IdxFile",
    "cache_dir",
    "data_identity",
    "download_verified",
    "load_dataset",
    "parse_idx",
    "read_idx",
]


class DataUnavailable(RuntimeError):
    """Raised when a dataset cannot be found locally nor downloaded; the message says what to do."""


class DataError(RuntimeError):
    """Data files that are unreadable, truncated, malformed, or not the files of the named public dataset.

    The message names the file, what is wrong with it and what to do."""


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
    """One IDX file of a dataset: its file name and the digests that identify the official file.

    ``sha256`` and ``md5`` check the ``.gz`` archive byte for byte (``md5``: the digest the dataset's
    authors publish); ``content_sha256`` checks the decompressed IDX bytes, independent of how the archive
    was compressed (Debian's ``dataset-fashion-mnist`` recompressed the archives: different ``.gz`` bytes,
    same content). A file passes when any known digest matches.
    """

    name: str
    sha256: str | None = None
    content_sha256: str | None = None
    md5: str | None = None


_MNIST_SHAPES = {"train_x": (60000, 28, 28), "train_y": (60000,), "test_x": (10000, 28, 28), "test_y": (10000,)}

_IDX_SETS: dict[str, dict] = {
    # MNIST: SHA-256 of the .gz as served by the mirrors (recorded when the lab was written) and the MD5s
    # published with the dataset (LeCun's page; the ones torchvision checks).
    "mnist": {
        "urls": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ],
        "files": {
            "train_x": IdxFile(
                "train-images-idx3-ubyte.gz",
                sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
            ),
            "train_y": IdxFile(
                "train-labels-idx1-ubyte.gz",
                sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                md5="d53e105ee54ea40749a09fcbcd1e9432",
            ),
            "test_x": IdxFile(
                "t10k-images-idx3-ubyte.gz",
                sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                md5="9fb629c4189551a2d022fa330f9573f3",
            ),
            "test_y": IdxFile(
                "t10k-labels-idx1-ubyte.gz",
                sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                md5="ec29112dd5afa0611ce80d1b7f02629c",
            ),
        },
        "shapes": _MNIST_SHAPES,
        "classes": 10,
    },
    # Fashion-MNIST: the MD5s of the .gz files published in zalandoresearch/fashion-mnist's README; the
    # SHA-256 of the decompressed content, measured on Debian's dataset-fashion-mnist
    # (0.0~git20200523.55506a9-1; its .gz files are recompressed, so their MD5s differ from the published
    # ones) and, for the two label files, checked against the official archives of the zalandoresearch
    # repository (whose MD5s match the published ones; their .gz SHA-256 are recorded too). The official
    # image archives were not available to measure, so images are checked by content or published MD5.
    "fashion-mnist": {
        "urls": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "files": {
            "train_x": IdxFile(
                "train-images-idx3-ubyte.gz",
                content_sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            ),
            "train_y": IdxFile(
                "train-labels-idx1-ubyte.gz",
                sha256="a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                content_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                md5="25c81989df183df01b3e8a0aad5dffbe",
            ),
            "test_x": IdxFile(
                "t10k-images-idx3-ubyte.gz",
                content_sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                md5="bef4ecab320f06d8554ea6380940ec79",
            ),
            "test_y": IdxFile(
                "t10k-labels-idx1-ubyte.gz",
                sha256="67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                content_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                md5="bb300cfdad3c16e7a12a480ee83cd310",
            ),
        },
        "shapes": _MNIST_SHAPES,
        "classes": 10,
    },
    # your own IDX files (``--dataset idx --data-dir DIR``): same file names, any image size and number of
    # examples, labels 0..K-1; no published digests, identified by content only, never downloaded
    "idx": {
        "urls": [],
        "files": {
            "train_x": IdxFile("train-images-idx3-ubyte.gz"),
            "train_y": IdxFile("train-labels-idx1-ubyte.gz"),
            "test_x": IdxFile("t10k-images-idx3-ubyte.gz"),
            "test_y": IdxFile("t10k-labels-idx1-ubyte.gz"),
        },
        "shapes": None,
        "classes": None,
        "custom": True,
    },
}

#: Label values accepted in a custom ``idx`` dataset: 0..MAX_CLASSES-1.
MAX_CLASSES = 256


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _decompress(raw: bytes) -> bytes:
    """The IDX bytes of ``raw`` (gunzipped when it is a gzip archive); ``ValueError`` when it is broken."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; EOFError: truncated
        raise ValueError(f"not a valid gzip archive, truncated or corrupt ({exc})") from None


def matches(raw: bytes, spec: IdxFile, content: bytes | None = None) -> bool:
    """Whether ``raw`` (a ``.gz`` archive or plain IDX bytes) is the official file ``spec``."""
    if spec.sha256 is not None and _sha256(raw) == spec.sha256:
        return True
    if spec.md5 is not None and _md5(raw) == spec.md5:
        return True
    if spec.content_sha256 is not None:
        if content is None:
            try:
                content = _decompress(raw)
            except ValueError:
                return False
        return _sha256(content) == spec.content_sha256
    return False


def verify(data: bytes, spec: IdxFile) -> None:
    """Raise ``ValueError`` unless ``data`` matches a known digest of ``spec``."""
    if spec.sha256 is None and spec.content_sha256 is None and spec.md5 is None:
        raise ValueError(f"no known SHA-256 for {spec.name}; refusing to trust a download")
    if not matches(data, spec):
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


#: Where Debian's dataset packages install their files (``dataset-fashion-mnist``).
SYSTEM_DATASETS = Path("/usr/share/datasets")


def _find_local(name: str, filename: str, data_dir: str | os.PathLike | None) -> Path | None:
    stem = filename[:-3] if filename.endswith(".gz") else filename
    candidates: list[Path] = []
    if data_dir is not None:
        d = Path(data_dir)
        candidates += [d / filename, d / stem, d / name / filename, d / name / stem]
    if not _IDX_SETS[name].get("custom"):  # your own files come from --data-dir only
        candidates += [SYSTEM_DATASETS / name / filename, SYSTEM_DATASETS / name / stem]
        c = cache_dir() / name
        candidates += [c / filename, c / stem]
    for path in candidates:
        if path.is_file():
            return path
    return None


_WHAT = {"train_x": "training images", "train_y": "training labels", "test_x": "test images",
         "test_y": "test labels"}


def _fix_hint(name: str) -> str:
    if name == "fashion-mnist":
        return ("Delete or replace it (Debian: `apt-get install --reinstall dataset-fashion-mnist`), "
                "or train on your own files with --dataset idx --data-dir DIR.")
    if name == "mnist":
        return ("Delete or replace it with the official file, or train on your own files with "
                "--dataset idx --data-dir DIR.")
    return "Replace it with a valid IDX file."


def read_checked(path: Path, name: str, key: str, verify_digest: bool = True,
                 _keep: dict | None = None) -> tuple[np.ndarray, str]:
    """Read one IDX file of dataset ``name`` and check it; return ``(array, SHA-256 of its IDX bytes)``.

    Checks: readable, valid gzip (when compressed), valid IDX, unsigned bytes, the shape and label range of
    the dataset, and (public datasets, ``verify_digest``) a published digest. Raises :class:`DataError`
    naming the file, what is wrong and what to do.
    """
    spec_set = _IDX_SETS[name]
    hint = _fix_hint(name)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}).") from None
    try:
        content = _decompress(raw)
        arr = parse_idx(content)
    except ValueError as exc:
        raise DataError(f"{path} ({_WHAT[key]} of {name}) is unusable: {exc}. {hint}") from None
    if arr.dtype != np.uint8:
        raise DataError(f"{path} ({_WHAT[key]} of {name}) holds {arr.dtype} values; IDX unsigned bytes expected. "
                        f"{hint}")
    want = (spec_set.get("shapes") or {}).get(key)
    if want is not None and arr.shape != want:
        raise DataError(f"{path} ({_WHAT[key]} of {name}) has shape {'x'.join(map(str, arr.shape))}; "
                        f"{name}'s is {'x'.join(map(str, want))}. {hint}")
    if want is None and arr.ndim != (3 if key.endswith("_x") else 1):
        raise DataError(f"{path} ({_WHAT[key]}) has {arr.ndim} dimensions; "
                        f"{'N x H x W images' if key.endswith('_x') else 'a vector of N labels'} expected.")
    if key.endswith("_y") and arr.size:
        top = int(arr.max())
        classes = spec_set.get("classes") or MAX_CLASSES
        if top >= classes:
            raise DataError(f"{path} ({_WHAT[key]} of {name}) holds label {top}; labels must be 0..{classes - 1}. "
                            f"{hint}")
    if verify_digest:
        check_digest(path, name, key, raw, content)
    if _keep is not None:
        _keep[key] = (raw, content)
    return arr, _sha256(content)


def check_digest(path: Path, name: str, key: str, raw: bytes | None = None, content: bytes | None = None) -> None:
    """Raise :class:`DataError` unless ``path`` is the official file ``key`` of the public dataset ``name``
    (custom datasets have no digest: always passes)."""
    spec_set = _IDX_SETS[name]
    if spec_set.get("custom"):
        return
    spec: IdxFile = spec_set["files"][key]
    raw = path.read_bytes() if raw is None else raw
    if not matches(raw, spec, content):
        if content is None:
            try:
                content = _decompress(raw)
            except ValueError:
                content = raw
        published = ", ".join(f"{k} {v}" for k, v in (("SHA-256 of the content", spec.content_sha256),
                                                       ("SHA-256", spec.sha256), ("MD5", spec.md5)) if v)
        raise DataError(f"{path} is not the official {name} file {spec.name}: its digests (content SHA-256 "
                        f"{_sha256(content)[:16]}…) match none of the published ones ({published}). "
                        f"{_fix_hint(name)}")


def _identity(parts: list[tuple[str, str]]) -> str:
    """The data identity: SHA-256 over ``key=digest`` lines (one per array), 32 hex digits."""
    return "sha256:" + _sha256("\n".join(f"{k}={d}" for k, d in parts).encode())[:32]


def _array_digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def load_idx_set(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    opener: Opener | None = None,
    base_urls: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Return ``{"train_x", "train_y", "test_x", "test_y"}`` arrays for an IDX dataset (checked files)."""
    return _load_idx_checked(name, data_dir, download, opener, base_urls)[0]


def _load_idx_checked(name, data_dir=None, download=True, opener=None, base_urls=None):
    spec = _IDX_SETS[name]
    out: dict[str, np.ndarray] = {}
    digests = []
    paths = {}
    blobs: dict[str, tuple[bytes, bytes]] = {}
    for key, f in spec["files"].items():
        path = _find_local(name, f.name, data_dir)
        if path is None:
            if not download or spec.get("custom"):
                raise DataUnavailable(_missing_message(name, data_dir))
            try:
                path = download_verified(f, base_urls or spec["urls"], cache_dir() / name, opener)
            except DataUnavailable as exc:
                raise DataUnavailable(_missing_message(name, data_dir) + f"\n(download failed: {exc})") from exc
        # shapes and labels of every file first (the most telling message), then the published digests
        out[key], digest = read_checked(path, name, key, verify_digest=False, _keep=blobs)
        digests.append((key, digest))
        paths[key] = path
    if out["train_x"].shape[0] != out["train_y"].shape[0] or out["test_x"].shape[0] != out["test_y"].shape[0]:
        raise DataError(f"{name}: image and label files disagree on the number of examples "
                        f"({out['train_x'].shape[0]} vs {out['train_y'].shape[0]} training, "
                        f"{out['test_x'].shape[0]} vs {out['test_y'].shape[0]} test)")
    if out["train_x"].shape[1:] != out["test_x"].shape[1:]:
        raise DataError(f"{name}: training images are {'x'.join(map(str, out['train_x'].shape[1:]))} but test "
                        f"images {'x'.join(map(str, out['test_x'].shape[1:]))}")
    if len(out["train_y"]) < 2 or len(out["test_y"]) < 1:
        raise DataError(f"{name}: at least 2 training and 1 test example are needed")
    for key, path in paths.items():
        check_digest(path, name, key, *blobs[key])
    return out, _identity(digests)


def _missing_message(name: str, data_dir) -> str:
    files = ", ".join(f.name for f in _IDX_SETS[name]["files"].values())
    if _IDX_SETS[name].get("custom"):
        where = f"in --data-dir {data_dir}" if data_dir else "without --data-dir"
        return (f"dataset 'idx' (your own IDX files) needs --data-dir DIR holding {files}; none found {where}.")
    where = f"--data-dir {data_dir}, " if data_dir else ""
    hint = (
        "On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist/."
        if name == "fashion-mnist"
        else "Download them from the official mirror and pass --data-dir DIR."
    )
    return (
        f"dataset {name!r} is not available: looked for {files} in {where}{SYSTEM_DATASETS / name}/ "
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


#: Data identity of MNIST-1D as generated by ``mnist1d`` 0.0.2 (``make_dataset``, seed 42, 5000 samples).
#: A cached copy that does not match is regenerated; a generator that produces other data (another
#: ``mnist1d`` version) is used, under its own identity.
MNIST1D_IDENTITY = {(42, 5000): "sha256:2ac11fef8862b0d44734991ecc1bfe65"}


def _generate_mnist1d(seed: int, num_samples: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    d = make_dataset(args)
    return {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}


def _raw_identity(raw: dict[str, np.ndarray]) -> str:
    return _identity([(k, _array_digest(raw[k])) for k in ("x", "y", "x_test", "y_test")])


def _mnist1d_raw(seed: int, num_samples: int) -> dict[str, np.ndarray]:
    return _mnist1d_raw_id(seed, num_samples)[0]


def _mnist1d_raw_id(seed: int, num_samples: int) -> tuple[dict[str, np.ndarray], str]:
    """MNIST-1D arrays and their identity, from the cache when it holds the known data."""
    path = cache_dir() / f"mnist1d-seed{seed}-n{num_samples}.npz"
    known = MNIST1D_IDENTITY.get((seed, num_samples))
    if path.is_file():
        try:
            with np.load(path) as z:
                raw = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
            ident = _raw_identity(raw)
            if known is None or ident == known:
                return raw, ident
        except Exception:  # a corrupt or altered cache file is regenerated
            pass
    raw = _generate_mnist1d(seed, num_samples)
    ident = _raw_identity(raw)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **raw)
        os.replace(tmp, path)
    except OSError:  # read-only home: work without a cache
        pass
    return raw, ident


def _check_labels(name: str, *ys: np.ndarray, classes: int = 10) -> None:
    for y in ys:
        if y.size and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise DataError(f"{name}: labels must be 0..{classes - 1}, found {int(y.min())}..{int(y.max())}")


def _raw_mnist1d(data_dir=None, seed: int = 42, **_) -> tuple[dict, str, dict]:
    raw, ident = _mnist1d_raw_id(seed, 5000)
    _check_labels("mnist1d", raw["y"], raw["y_test"])
    arrays = {"x": raw["x"][:, None, :], "y": raw["y"], "x_test": raw["x_test"][:, None, :], "y_test": raw["y_test"]}
    return arrays, ident, {"source": f"mnist1d.make_dataset(seed={seed})", "classes": 10}


def _raw_idx(name: str, data_dir=None, download: bool = True, **_) -> tuple[dict, str, dict]:
    arrays, ident = _load_idx_checked(name, data_dir, download)
    classes = _IDX_SETS[name].get("classes") or int(max(arrays["train_y"].max(), arrays["test_y"].max())) + 1
    # kept as bytes (the memo holds them): scaled to [0, 1] floats when a Dataset is built
    out = {"x": arrays["train_x"][:, None], "y": arrays["train_y"], "x_test": arrays["test_x"][:, None],
           "y_test": arrays["test_y"]}
    return out, ident, {"source": "IDX files", "classes": max(2, classes), "divide": 255.0}


def _raw_digits(data_dir=None, **_) -> tuple[dict, str, dict]:
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
    raw = {"x": x[tr], "y": y[tr], "x_test": x[te], "y_test": y[te]}
    return raw, _raw_identity(raw), {"source": "sklearn.load_digits", "classes": 10}


_RAW_LOADERS: dict[str, Callable[..., tuple[dict, str, dict]]] = {
    "mnist1d": _raw_mnist1d,
    "fashion-mnist": lambda **kw: _raw_idx("fashion-mnist", **kw),
    "mnist": lambda **kw: _raw_idx("mnist", **kw),
    "digits": _raw_digits,
    "idx": lambda **kw: _raw_idx("idx", **kw),
}
_RAW_MEMO: dict[tuple, tuple[dict, str, dict]] = {}

#: Validation fraction and split seed of each dataset when not given.
_DEFAULTS = {"mnist1d": (0.1, 42), "fashion-mnist": (1 / 12, 0), "mnist": (1 / 12, 0), "digits": (0.1, 0),
             "idx": (1 / 12, 0)}


def _dir_key(data_dir) -> str | None:
    return None if data_dir is None else str(Path(data_dir).resolve())


def _raw(name: str, data_dir=None, **kw) -> tuple[dict, str, dict]:
    if name not in _RAW_LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    key = (name, _dir_key(data_dir), tuple(sorted(kw.items())))
    if key not in _RAW_MEMO:
        _RAW_MEMO[key] = _RAW_LOADERS[name](data_dir=data_dir, **kw)
    return _RAW_MEMO[key]


def data_identity(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The identity of the data ``name`` stands for, as found now: ``"sha256:…"`` over each array's
    digest (IDX datasets: the SHA-256 of each file's IDX bytes). Loads and checks the data (memoized per
    process); raises :class:`DataUnavailable` or :class:`DataError` like :func:`load_dataset`."""
    return _raw(name, data_dir)[1]


def _build(name: str, data_dir=None, seed: int | None = None, val_fraction: float | None = None,
           limit: int | None = None, **kw) -> Dataset:
    dv, ds = _DEFAULTS[name]
    raw_kw = {"seed": seed} if (name == "mnist1d" and seed is not None) else {}
    raw_kw.update(kw)
    arrays, ident, info = _raw(name, data_dir, **raw_kw)
    x, x_test = arrays["x"], arrays["x_test"]
    if "divide" in info:
        x = x.astype(np.float32) / info["divide"]
        x_test = x_test.astype(np.float32) / info["divide"]
    return _split_normalize(
        name, x, arrays["y"], x_test, arrays["y_test"], info["classes"],
        dv if val_fraction is None else val_fraction, ds if seed is None else seed, limit,
        {"source": info["source"], "data_id": ident},
    )


def load_mnist1d(seed: int = 42, val_fraction: float = 0.1, limit: int | None = None, **_) -> Dataset:
    """MNIST-1D (Greydanus 2020): 4000 train / 1000 test sequences of 40 values, 10 classes."""
    return _build("mnist1d", seed=seed, val_fraction=val_fraction, limit=limit)


def _load_idx_dataset(name: str, data_dir=None, val_fraction: float = 1 / 12, seed: int = 0,
                      limit: int | None = None, download: bool = True, **_) -> Dataset:
    extra = {} if download else {"download": False}
    return _build(name, data_dir=data_dir, seed=seed, val_fraction=val_fraction, limit=limit, **extra)


def load_digits_dataset(seed: int = 0, val_fraction: float = 0.1, limit: int | None = None, **_) -> Dataset:
    """scikit-learn's 1797 8x8 digits; a seeded 80/20 train/test split (no official one exists)."""
    return _build("digits", seed=seed, val_fraction=val_fraction, limit=limit)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": load_mnist1d,
    "fashion-mnist": lambda **kw: _load_idx_dataset("fashion-mnist", **kw),
    "mnist": lambda **kw: _load_idx_dataset("mnist", **kw),
    "digits": load_digits_dataset,
    "idx": lambda **kw: _load_idx_dataset("idx", **kw),
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
    """Load a dataset by name (memoized per process). ``limit`` caps the training split (tests).

    ``Dataset.info["data_id"]`` is the identity of the data read (see :func:`data_identity`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (got {limit})")
    key = (name, seed, _dir_key(data_dir), limit, val_fraction)
    if key not in _MEMO:
        _MEMO[key] = _build(name, data_dir=data_dir, seed=seed, val_fraction=val_fraction, limit=limit)
    return _MEMO[key]
