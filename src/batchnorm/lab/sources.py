"""Where the lab's data comes from: the IDX format, the public datasets' files and their digests, local
search (``--data-dir``, Debian's ``/usr/share/datasets``, the cache) and verified download, and the errors
and data identities every loader shares.

A file of a public dataset (``mnist``, ``fashion-mnist``), wherever it was found, is checked before use: its
shapes and label range, and its digest against the published one; a file that does not match is refused with
:class:`DataError`. :mod:`.data` builds the datasets from these files.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DataError", "DataUnavailable", "IdxFile", "cache_dir", "download_verified", "load_idx_set", "parse_idx",
           "read_idx", "write_idx"]

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



_IDX_DTYPES: dict[int, np.dtype[Any]] = {
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
    with urllib.request.urlopen(url, timeout=30) as response:  # http(s) URLs only by default
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
