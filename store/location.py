"""Where a store lives: a local directory, or any fsspec URL read lazily where it is.

A local store is a ``pathlib.Path``; anything with a protocol (``s3://``, ``gs://``, ``memory://``,
``http(s)://``) is a ``RemotePath``, the few ``Path`` methods the reader needs, over an fsspec filesystem.
``file://`` URLs become plain paths. Credentials come from the filesystem's usual environment (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``/``AWS_ENDPOINT_URL``; for GCS: ``GOOGLE_APPLICATION_CREDENTIALS``);
``QCACHE_STORAGE_OPTIONS`` (a JSON object, e.g. ``{"anon": true}``) is passed to the filesystem as well.

>>> locate("file:///tmp/s")
PosixPath('/tmp/s')
>>> str(locate("memory://demo/s") / "runs")
'memory://demo/s/runs'
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Union

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import QCacheError, StoreError

# Protocols whose filesystems cannot write: tables for such a store go to ``--results``.
READ_ONLY_PROTOCOLS = ("http", "https")
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}


# Packages whose exceptions mean a remote store cannot be reached or read (no credentials, unknown host,
# denied, no such bucket, a server without Range requests): matched by module, so none is imported here.
REMOTE_PACKAGES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "fsspec", "requests")


def remote_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a remote filesystem, means the store cannot be reached or read. A missing
    file (``FileNotFoundError``) is not: callers ask for files that may not exist."""
    if isinstance(exc, (QCacheError, FileNotFoundError)):
        return False
    if isinstance(exc, (OSError, ValueError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in REMOTE_PACKAGES


def failure_text(exc: BaseException) -> str:
    """The first line of ``exc``, named by its type, with the fix where it is known."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
    if "range requests" in text.lower():
        return f"{text[:120]}... the HTTP server does not answer Range requests; serve it from one that does"
    return text


@contextlib.contextmanager
def remote_errors(where: object, action: str = "read") -> Iterator[None]:
    """Turn a remote filesystem's failure (``remote_failure``) into one ``StoreError`` line (what, why,
    fix)."""
    try:
        yield
    except Exception as exc:
        if not remote_failure(exc):
            raise
        raise StoreError(
            f"cannot {action} {where}: {failure_text(exc)}; check the URL, the network and the credentials "
            "(AWS_*/GOOGLE_APPLICATION_CREDENTIALS, QCACHE_STORAGE_OPTIONS; docs/scale-out.md)"
        ) from exc


class RemotePath:
    """A file or directory on an fsspec filesystem, with the ``Path`` methods qcache's readers use."""

    def __init__(self, fs: Any, path: str, options: dict[str, Any] | None = None) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.options = options or {}

    def __truediv__(self, part: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path}/{part}", self.options)

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, self.path.rsplit("/", 1)[0], self.options)

    @property
    def protocol(self) -> str:
        proto = self.fs.protocol
        return proto[0] if isinstance(proto, (tuple, list)) else str(proto)

    @property
    def writable(self) -> bool:
        return self.protocol not in READ_ONLY_PROTOCOLS

    # reading: a filesystem's failure (no credentials, unknown host ...) is one StoreError line
    def exists(self) -> bool:
        with remote_errors(self):
            return bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        with remote_errors(self):
            return bool(self.fs.isdir(self.path))

    def read_bytes(self) -> bytes:
        with remote_errors(self):
            return bytes(self.fs.cat_file(self.path))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def open(self, mode: str = "rb") -> BinaryIO:
        with remote_errors(self):
            return self.fs.open(self.path, mode)  # type: ignore[no-any-return]

    def iterdir(self) -> Iterator[RemotePath]:
        with remote_errors(self, "list"):
            names = self.fs.ls(self.path, detail=False)
        for p in names:
            if p.rstrip("/") != self.path:
                yield RemotePath(self.fs, p, self.options)

    def glob(self, pattern: str) -> list[RemotePath]:
        with remote_errors(self, "list"):
            found = sorted(self.fs.glob(f"{self.path}/{pattern}"))
        return [RemotePath(self.fs, p, self.options) for p in found]

    # -- writing (tables and repair markers only: runs are written to local directories) --------------

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self._require_writable()
        self.fs.makedirs(self.path, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        self._require_writable()
        self.fs.pipe_file(self.path, data)  # one PUT: an object store's write is atomic

    def unlink(self, missing_ok: bool = False) -> None:
        self._require_writable()
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(
                f"cannot write to {self}: {self.protocol}:// stores are read-only; pass --results DIR to "
                "write result tables to a local directory"
            )


StorePath = Union[Path, RemotePath]  # noqa: UP007 (a runtime alias, not an annotation)


def locate(where: str | os.PathLike[str] | RemotePath) -> StorePath:
    """A local ``Path`` for plain paths and ``file://`` URLs, else a ``RemotePath`` over fsspec."""
    if isinstance(where, (Path, RemotePath)):
        return where
    text = os.fspath(where)
    if "://" not in text:
        return Path(text).expanduser()  # "~/qcache-store" from Python, as a shell would expand it
    protocol = text.split("://", 1)[0].lower()
    if protocol == "file":
        return Path(text[len("file://") :])
    options = storage_options()
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(text, **options)
    except ImportError as exc:
        package = PACKAGES.get(protocol, f"the fsspec backend for {protocol}://")
        raise StoreError(f"{protocol}:// stores need {package}: pip install {package}") from exc
    except ValueError as exc:
        raise StoreError(f"cannot open {text}: {exc}; use a local path or an fsspec URL") from exc
    except Exception as exc:  # a filesystem that connects when made (ftp://, sftp://): unknown host, refused
        if not remote_failure(exc):
            raise
        raise StoreError(
            f"cannot open {text}: {failure_text(exc)}; check the URL, the network and the credentials"
        ) from exc
    return RemotePath(fs, path, options)


def storage_options() -> dict[str, Any]:
    """Extra fsspec options from ``QCACHE_STORAGE_OPTIONS`` (a JSON object), else none."""
    raw = os.environ.get("QCACHE_STORAGE_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise StoreError(
            f"QCACHE_STORAGE_OPTIONS is not JSON ({exc}): set it to an object like '{{\"anon\": true}}'"
        ) from exc
    if not isinstance(options, dict):
        raise StoreError("QCACHE_STORAGE_OPTIONS must be a JSON object, like '{\"anon\": true}'")
    return options


def zarr_location(p: StorePath) -> Any:
    """What ``zarr.open_array(store=...)`` takes for ``p``: a path string, or a read-only FsspecStore."""
    if isinstance(p, Path):
        return str(p)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(p), storage_options=p.options, read_only=True)


def read_parquet(p: StorePath, columns: list[str] | None = None) -> pa.Table:
    if isinstance(p, Path):
        return pq.read_table(p, columns=columns)
    with remote_errors(p), p.open("rb") as fh:
        return pq.read_table(fh, columns=columns)


def tree_size(p: StorePath) -> int:
    """Bytes of every file below ``p``."""
    if isinstance(p, Path):
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if not p.exists():
        return 0
    with remote_errors(p):
        return int(p.fs.du(p.path, total=True))


def write_file(p: StorePath, data: bytes) -> None:
    """Write a whole file atomically: fsync + rename locally, one PUT on an object store."""
    if isinstance(p, Path):
        from .progress import atomic_write

        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, data)
    else:
        p.write_bytes(data)


def local_dir(where: str | os.PathLike[str] | RemotePath) -> Path:
    """The local directory a run is written to; a URL other than ``file://`` is refused in one line."""
    p = where if isinstance(where, RemotePath) else locate(where)
    if isinstance(p, RemotePath):
        raise StoreError(
            f"runs are written to a local directory, not to {p}: extract into a local --store, then copy "
            "it (e.g. `aws s3 sync`, `gsutil rsync`); every reading command opens the URL"
        )
    return p
